"""Checks that fail a run in seconds, before Ray, Flower or any worker starts.

An out_dir that holds another run, a bad data path, a missing GPU or a model too large for the
machine would otherwise surface only after the simulation and its workers are up (tens of
seconds and a page of Flower internals later, or an OOM kill with no message at all). Each check raises
ConfigError with one sentence that names the key and the file or path to fix. They are cheap
by design: they look at where the data is and sample the start of each file, they never
load the corpus.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from fl_diloco.config import ConfigError, RunConfig, resolve_device
from fl_diloco.data import (_JSON_EXTS, _TEXT_EXTS, HF_PREFIX, SHAKESPEARE, _resolve_local_files,
                            _saved_dataset_dir)
from fl_diloco.memory import check_memory
from fl_diloco.run_dir import check_out_dir

# How much of each text file is sampled: enough to tell text from binary (git looks at the
# first 8000 bytes for a NUL), little enough that a directory of many files is checked at once.
SAMPLE_BYTES = 8192


def check_before_start(cfg: RunConfig, workers_here: int = 0) -> None:
    """Everything a run needs that can be checked before it starts; raises ConfigError.
    `workers_here`: how many of its workers will share this machine (0 = none, or unknown)."""
    check_out_dir(cfg)  # a new run never writes into another run's directory
    check_data_source(cfg)
    check_fragments(cfg)
    resolve_device(cfg.device)  # device=cuda on a machine without CUDA
    check_memory(cfg, workers_here)


def check_fragments(cfg: RunConfig) -> None:
    """Streaming needs at least one transformer block per fragment (blocks are never split)."""
    if not cfg.streaming:
        return
    from fl_diloco.model import model_config

    blocks = model_config(cfg.model_preset, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len).n_layers
    if cfg.fragments > blocks:
        raise ConfigError(f"fragments={cfg.fragments} needs at least {cfg.fragments} transformer blocks, "
                          f"but model={cfg.model} has {blocks}: lower fragments to {blocks} or less, "
                          f"or pick a model with more blocks")


def check_data_source(cfg: RunConfig) -> None:
    """A local data_source exists, holds files, and its text files hold decodable text."""
    source = cfg.data_source
    if source == SHAKESPEARE or source.startswith(HF_PREFIX) or _saved_dataset_dir(source):
        return  # shipped with the package, or read (and checked) by `datasets`
    try:
        files = _resolve_local_files(source)
    except ValueError as err:  # an empty directory, or a glob that matches nothing
        raise ConfigError(f"data_source={source}: {err}") from None
    if files is None:
        raise ConfigError(f"data_source={source}: no such file, directory or glob; use 'shakespeare', "
                          f"a local .txt/.jsonl/.json/.parquet file, directory or glob, or "
                          f"'hf:<dataset>[:<config>]'")
    for path in files:
        suffix = path.suffix.lower()
        if suffix in (*_TEXT_EXTS, *_JSON_EXTS):
            # encoding_errors=replace lets .txt files through with bad bytes; JSON must be UTF-8.
            problem = text_file_problem(path, strict=suffix in _JSON_EXTS or cfg.encoding_errors == "strict")
        else:
            problem = "is empty" if path.stat().st_size == 0 else None
        if problem:
            raise ConfigError(f"data_source={source}: {path} {problem}")


def text_file_problem(path: Path, strict: bool = True) -> str | None:
    """Why `path` cannot be read as text (the end of a phrase), or None if it can; with
    `strict`, bytes that are not UTF-8 count too."""
    with path.open("rb") as f:
        sample = f.read(SAMPLE_BYTES)
        whole = not f.read(1)
    if whole and not sample.strip():
        return "is empty" if not sample else "holds only whitespace"
    if b"\x00" in sample:
        return "looks binary (it holds NUL bytes), not text"
    if not strict:
        return None
    try:
        # Incremental, so a multi-byte character cut at the end of the sample is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=whole)
    except UnicodeDecodeError as err:
        hint = "; re-encode it as UTF-8" + (", or set encoding_errors=replace to read bad bytes "
                                            "as U+FFFD" if path.suffix.lower() in _TEXT_EXTS else "")
        return f"is not UTF-8 text at byte {err.start}{hint}"
    return None
