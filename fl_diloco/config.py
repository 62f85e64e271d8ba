"""Run configuration: one dataclass that every entry point validates against.

`flwr run . --run-config`, the Hydra configs under `conf/` and the `fl-diloco` CLI all end
up in `RunConfig.from_mapping`, so a key means the same thing everywhere and a typo fails
before any training starts. The defaults here are the single source of truth: the test
suite checks that `[tool.flwr.app.config]` in pyproject.toml and `conf/config.yaml` repeat
them exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALGORITHMS = ("dp", "diloco", "delayed", "eager")
FRAGMENT_PATTERNS = ("strided", "sequential")
WIRE_PRECISIONS = ("fp32", "bf16", "fp8", "fp4")
WEIGHTINGS = ("uniform", "tokens")
# The algorithms that apply an average `delay` outer steps late instead of waiting for it.
LATE_ALGORITHMS = ("delayed", "eager")
DEVICES = ("auto", "cpu", "cuda")
# What the inner loop's forward/backward computes in (master weights and optimizer states stay fp32).
COMPUTE_PRECISIONS = ("auto", "bf16", "fp32")
# What one document of a .txt source is (fl_diloco.data.DataConfig.document_unit), and what
# to do with bytes that are not UTF-8 (Python's `errors=` names).
DOCUMENT_UNITS = ("file", "paragraph")
ENCODING_ERRORS = ("strict", "replace")
# How a site's ranks split the work (clients/site.py): replicas, or FSDP2 shards.
PARALLELISMS = ("ddp", "fsdp")
# worker_idle_timeout=0: a worker exits after this many round timeouts without a request.
IDLE_ROUND_TIMEOUTS = 3


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    # What to run.
    algorithm: str = "diloco"
    model: str = "tiny"
    num_clients: int = 4
    inner_steps: int = 30
    rounds: int = 20
    seed: int = 0

    # Data (see fl_diloco.data.DataConfig).
    data_source: str = "shakespeare"
    text_column: str = "text"
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 8
    # Sequences per forward/backward; an inner step accumulates batch_size / micro_batch_size
    # of them (0 = the whole batch at once).
    micro_batch_size: int = 0
    val_fraction: float = 0.05
    max_documents: int = 0  # 0 = use every document
    # A .txt file is one document (the unit of the train/validation split) unless "paragraph".
    document_unit: str = "file"
    # Non-UTF-8 bytes in .txt files: "strict" stops naming file and byte, "replace" reads U+FFFD.
    encoding_errors: str = "strict"

    # Inner optimizer: AdamW with linear warmup, then cosine decay over the run's inner steps.
    inner_lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    # The outer steps the warmup + cosine spans (0 = rounds). A run extended past its rounds
    # (resume=DIR rounds=N) keeps its original value, so its extra steps run at the floor LR.
    lr_schedule_rounds: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    # Outer optimizer: Nesterov SGD in torch.optim.SGD's parameterisation.
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    weighting: str = "uniform"

    # Overlap variants (docs/algorithms.md#eager-updates): `delay` is how many outer steps old
    # the average is when `delayed` or `eager` applies it; `diloco` always waits for the fresh one.
    delay: int = 1
    # Streaming DiLoCo: P fragments, one synced every H/P inner steps (one Flower round each);
    # the average is applied `overlap_steps` (τ) inner steps after the sync, then merged into
    # the local copy as α·local + (1 − α)·global with α = `mixing`.
    streaming: bool = False
    fragments: int = 1
    fragment_pattern: str = "strided"
    overlap_steps: int = 0
    mixing: float = 0.0
    # Precision of outer gradients on the wire, both directions; the math stays fp32.
    wire_precision: str = "fp32"

    # Evaluation and outputs.
    eval_every: int = 5
    eval_sequences: int = 256
    out_dir: str = ""  # "" = ./runs/<algorithm>-<timestamp>, made absolute at start
    # Replace the run already in out_dir (fl_diloco/run_dir.py); without it a run refuses to start there.
    overwrite: bool = False
    # Every `checkpoint_every` outer steps the server writes a resumable checkpoint (0 = none
    # but the final round's, which every run writes); the newest `keep_checkpoints` are kept.
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    # A run's out_dir to continue from its newest checkpoint ("" = start fresh).
    resume: str = ""
    tensorboard: bool = False  # also write metrics as TensorBoard events under out_dir/tensorboard

    # Hostile or broken replies: an outer gradient whose norm exceeds
    # `outlier_norm_ratio` × the round's median is rejected (0 = no check); a reply larger
    # than `max_reply_bytes` is rejected (0 = twice what the fragment's outer gradient needs).
    outlier_norm_ratio: float = 10.0
    max_reply_bytes: int = 0

    # Runtime.
    device: str = "auto"
    # auto = bf16 autocast on a CUDA device that has it, else fp32 (clients/inner_loop.py).
    precision: str = "auto"
    compile: bool = False  # torch.compile the worker's model
    peak_flops: float = 0.0  # one worker's peak FLOP/s for MFU (0 = fl_diloco.flops' table)
    threads_per_worker: int = 0  # 0 = share the machine's cores among the workers
    # The server's evaluation and aggregation (0 = the cores the workers leave free, at least 1).
    server_threads: int = 0
    # A site (one Flower node) trains on this many processes, one torch.distributed group
    # (clients/site.py); each takes batch_size sequences of the site's batch per inner step.
    ranks_per_worker: int = 1
    parallelism: str = "ddp"  # how the site's ranks split the work (PARALLELISMS)
    round_timeout: float = 600.0
    # Seconds every worker has to start (load its corpus, build its model) and confirm θ(0).
    startup_timeout: float = 1800.0
    node_wait_timeout: float = 120.0
    # 0 = IDLE_ROUND_TIMEOUTS × round_timeout: a run's server sends each node a request at least
    # once a round_timeout, so a worker idle for several of them has no server driving it.
    worker_idle_timeout: float = 0.0

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], validate: bool = True) -> RunConfig:
        """Build and validate a config; unknown keys and bad values raise ConfigError.

        `validate=False` only checks keys and types: for the ClientApp adapter, which Flower
        starts for every message and which must not import torch (the model presets); the
        server and the worker validate the same config in full.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"unknown config key '{raw_key}'.{hint} Valid keys: {', '.join(known)}"
                )
            kwargs[key] = _coerce(key, value, known[key].type)
        config = cls(**kwargs)
        if validate:
            config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.from_mapping({**self.to_dict(), **changes})

    def validate(self) -> None:
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("fragment_pattern", self.fragment_pattern, FRAGMENT_PATTERNS)
        _choice("wire_precision", self.wire_precision, WIRE_PRECISIONS)
        _choice("device", self.device.split(":")[0], DEVICES)
        _choice("precision", self.precision, COMPUTE_PRECISIONS)
        _choice("document_unit", self.document_unit, DOCUMENT_UNITS)
        _choice("encoding_errors", self.encoding_errors, ENCODING_ERRORS)
        _choice("parallelism", self.parallelism, PARALLELISMS)
        _at_least("ranks_per_worker", self.ranks_per_worker, 1)
        from fl_diloco.model import PRESETS  # local import: keeps config importable alone

        if self.model not in PRESETS and self.model not in MODEL_ALIASES:
            allowed = sorted([*PRESETS, *MODEL_ALIASES])
            raise ConfigError(
                f"model='{self.model}' is not a known preset; choose one of: {', '.join(allowed)}"
            )
        for key in ("num_clients", "inner_steps", "rounds", "vocab_size", "seq_len",
                    "batch_size", "eval_every", "eval_sequences"):
            _at_least(key, getattr(self, key), 1)
        for key in ("warmup_steps", "lr_schedule_rounds", "max_documents", "threads_per_worker",
                    "server_threads", "checkpoint_every", "max_reply_bytes", "micro_batch_size"):
            _at_least(key, getattr(self, key), 0)
        if self.micro_batch_size and (self.micro_batch_size > self.batch_size
                                      or self.batch_size % self.micro_batch_size):
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} must divide "
                              f"batch_size={self.batch_size} (or be 0 for the whole batch)")
        if self.peak_flops < 0:
            raise ConfigError(f"peak_flops must be >= 0 (0 = look the device up), got {self.peak_flops}")
        _at_least("vocab_size", self.vocab_size, 257)  # byte-level BPE needs the 256 bytes
        for key in ("inner_lr", "outer_lr", "round_timeout", "startup_timeout", "node_wait_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("min_lr_ratio", "beta1", "beta2", "outer_momentum", "weight_decay"):
            if not 0.0 <= getattr(self, key) < 1.0 + (key == "min_lr_ratio"):
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        if self.worker_idle_timeout < 0:
            raise ConfigError(f"worker_idle_timeout must be >= 0 (0 = {IDLE_ROUND_TIMEOUTS} × "
                              f"round_timeout), got {self.worker_idle_timeout}")
        if self.outlier_norm_ratio != 0 and not self.outlier_norm_ratio > 1:
            raise ConfigError(f"outlier_norm_ratio must be > 1 (or 0 to disable the check), "
                              f"got {self.outlier_norm_ratio}")
        if self.resume and not os.path.isabs(self.resume):
            raise ConfigError(f"resume must be the absolute path of a run's out_dir, got '{self.resume}'")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite=true would delete the run that resume continues; "
                              "leave one of them out")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        self._validate_overlap()
        if self.out_dir and not os.path.isabs(self.out_dir):
            raise ConfigError(
                f"out_dir must be an absolute path (the ServerApp's working directory "
                f"differs between simulation and deployment), got '{self.out_dir}'"
            )

    def _validate_overlap(self) -> None:
        if self.algorithm in LATE_ALGORITHMS and self.delay not in (1, 2):
            raise ConfigError(f"delay must be 1 or 2 outer steps for algorithm={self.algorithm}, "
                              f"got {self.delay}")
        if self.algorithm == "eager" and self.weighting != "uniform":
            raise ConfigError("algorithm=eager mixes its fresh outer gradient with weight 1/M, so it "
                              "needs weighting=uniform (every worker trains the same tokens per "
                              "phase, so token weights would be uniform anyway)")
        if not self.streaming:
            for key, neutral in (("fragments", 1), ("overlap_steps", 0), ("mixing", 0.0)):
                if getattr(self, key) != neutral:
                    raise ConfigError(f"{key}={getattr(self, key)} needs streaming=true "
                                      f"(or leave it at {neutral})")
            return
        if self.algorithm == "dp":
            raise ConfigError("streaming=true does not apply to algorithm=dp; use diloco, delayed or eager")
        _at_least("fragments", self.fragments, 1)
        if self.inner_steps % self.fragments:
            raise ConfigError(
                f"inner_steps={self.inner_steps} is not a multiple of fragments={self.fragments}: "
                f"fragments are synced every inner_steps/fragments steps; pick H divisible by P"
            )
        if not 0.0 <= self.mixing <= 1.0:
            raise ConfigError(f"mixing must be in [0, 1], got {self.mixing}")
        if self.algorithm == "diloco":
            if not 0 <= self.overlap_steps < self.sync_interval:
                raise ConfigError(
                    f"overlap_steps must be in [0, inner_steps/fragments = {self.sync_interval}), "
                    f"got {self.overlap_steps}"
                )
        elif self.overlap_steps or self.mixing:
            raise ConfigError(
                f"algorithm={self.algorithm} applies each fragment's average {self.delay} outer "
                f"step(s) later with its own rule, so overlap_steps and mixing must stay 0"
            )

    # Derived values, computed here once so every module agrees on them.
    @property
    def num_fragments(self) -> int:
        """P: 1 unless streaming."""
        return self.fragments if self.streaming else 1

    @property
    def sync_interval(self) -> int:
        """Inner steps between two Flower rounds: H/P."""
        return self.inner_steps // self.num_fragments

    @property
    def flower_rounds(self) -> int:
        """One Flower round per fragment sync: `rounds` outer steps × P."""
        return self.rounds * self.num_fragments

    @property
    def staleness(self) -> int:
        """d: how many outer steps old the average applied at a sync is (0 for diloco)."""
        return staleness(self.algorithm, self.delay)

    @property
    def model_preset(self) -> str:
        return MODEL_ALIASES.get(self.model, self.model)

    @property
    def variant_label(self) -> str:
        """A short name for plots and tables, e.g. 'eager d=1, streaming P=2, fp4'."""
        parts = [self.algorithm + (f" d={self.delay}" if self.staleness else "")]
        if self.streaming:
            parts.append(f"streaming P={self.fragments}"
                         + (f" τ={self.overlap_steps}" if self.overlap_steps else "")
                         + (f" α={self.mixing:g}" if self.mixing else ""))
        if self.wire_precision != "fp32":
            parts.append(self.wire_precision)
        return ", ".join(parts)

    def checkpoint_due(self, server_round: int) -> bool:
        """Whether the server checkpoints (and each worker saves its AdamW moments) after
        Flower round `server_round`: every `checkpoint_every` outer steps."""
        return bool(self.checkpoint_every) and server_round % (self.checkpoint_every * self.num_fragments) == 0

    @property
    def worker_idle_seconds(self) -> float:
        """How long a worker lives without a request: worker_idle_timeout, or by default a few
        round timeouts, so that a worker whose server failed does not hold its memory for long."""
        return self.worker_idle_timeout or IDLE_ROUND_TIMEOUTS * self.round_timeout

    @property
    def total_inner_steps(self) -> int:
        return self.rounds * self.inner_steps

    @property
    def lr_schedule_steps(self) -> int:
        """Inner steps the warmup + cosine spans: lr_schedule_rounds (or rounds) × H."""
        return (self.lr_schedule_rounds or self.rounds) * self.inner_steps

    def data_config(self) -> Any:
        from fl_diloco.data import DataConfig

        return DataConfig(
            source=self.data_source,
            text_column=self.text_column,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            val_fraction=self.val_fraction,
            seed=self.seed,
            max_documents=self.max_documents or None,
            document_unit=self.document_unit,
            encoding_errors=self.encoding_errors,
        )


def key_help() -> dict[str, tuple[str, str]]:
    """What each RunConfig key means and which values it takes: {key: (meaning, allowed)}.

    `fl-diloco train --help` prints it with the defaults; tests/test_docs.py fails when a
    key has no entry here. A new key adds its line in field order.
    """
    from fl_diloco.model import PRESETS  # local import: keeps config importable without torch

    def one_of(values: tuple[str, ...] | list[str]) -> str:
        return " | ".join(values)

    return {
        "algorithm": ("the method: dp = data-parallel baseline (same token budget), diloco, "
                      "delayed = naive delayed outer gradients, eager = eager updates",
                      one_of(ALGORITHMS)),
        "model": ("model shape: tiny (= tiny-1m), small (= tiny-10m), or the papers' shapes",
                  one_of([*MODEL_ALIASES, *PRESETS])),
        "num_clients": ("M, the workers (Flower clients, one per SuperNode)", ">= 1"),
        "inner_steps": ("H, inner AdamW steps per outer step", ">= 1; a multiple of fragments"),
        "rounds": ("T, outer steps (each is `fragments` Flower rounds when streaming): the token "
                   "budget does not depend on the variant", ">= 1"),
        "seed": ("seeds the data split, tokenizer, initialisation and batch order", "an integer"),
        "data_source": ("the corpus: shakespeare (bundled, offline), .txt/.jsonl/.json/.parquet "
                        "files (a file, directory or glob), or a Hugging Face Hub dataset",
                        "shakespeare | PATH | hf:DATASET[:CONFIG]"),
        "text_column": ("the column that holds the text in .jsonl/.json/.parquet/Hub sources",
                        "a column name"),
        "vocab_size": ("byte-level BPE vocabulary, trained on the training documents", ">= 257"),
        "seq_len": ("tokens per training sequence", ">= 1"),
        "batch_size": ("sequences per worker per inner step", ">= 1"),
        "micro_batch_size": ("sequences per forward/backward: each inner step accumulates the "
                             "gradients of batch_size / micro_batch_size of them (0 = the whole "
                             "batch at once)", "0, or a divisor of batch_size"),
        "val_fraction": ("share of the documents held out for evaluation (no worker trains on "
                         "them)", "0 < x < 0.5"),
        "max_documents": ("use only the first N documents of the source (0 = all)", ">= 0"),
        "document_unit": (".txt sources: one document per file, or per blank-line-separated "
                          "paragraph; the train/validation split is drawn over documents",
                          one_of(DOCUMENT_UNITS)),
        "encoding_errors": (".txt sources: stop at the first byte that is not UTF-8 (naming the "
                            "file and offset), or read it as U+FFFD and go on", one_of(ENCODING_ERRORS)),
        "inner_lr": ("AdamW's peak learning rate, reached after warmup_steps", "> 0"),
        "min_lr_ratio": ("the cosine decay ends at inner_lr × this", "0 <= x <= 1"),
        "warmup_steps": ("inner steps of linear learning-rate warmup", ">= 0"),
        "lr_schedule_rounds": ("outer steps the warmup + cosine spans (0 = rounds); a run extended "
                               "with resume keeps its original's and trains on at the floor", ">= 0"),
        "weight_decay": ("AdamW weight decay on matrices (norms and other 1-D weights get none)",
                         "0 <= x < 1"),
        "beta1": ("AdamW β1", "0 <= x < 1"),
        "beta2": ("AdamW β2", "0 <= x < 1"),
        "grad_clip": ("clip each inner step's global gradient norm to this (0 = off)", ">= 0"),
        "outer_lr": ("η, the outer Nesterov SGD's learning rate", "> 0"),
        "outer_momentum": ("μ, the outer Nesterov momentum (torch.optim.SGD(nesterov=True)'s "
                           "form)", "0 <= x < 1"),
        "weighting": ("how outer gradients are averaged: uniform (1/M) or by tokens trained; "
                      "eager needs uniform", one_of(WEIGHTINGS)),
        "delay": ("d, how many outer steps old the average is when delayed/eager apply it",
                  "1 | 2"),
        "streaming": ("Streaming DiLoCo: one fragment synced per Flower round, every H/P inner "
                      "steps; not with dp", "true | false"),
        "fragments": ("P, fragments of transformer blocks (streaming=true)",
                      "1 .. the model's blocks; divides inner_steps"),
        "fragment_pattern": ("strided: fragment p holds blocks p, p+P, ...; sequential: "
                             "contiguous runs of blocks", one_of(FRAGMENT_PATTERNS)),
        "overlap_steps": ("τ, inner steps between a fragment's sync and applying its average "
                          "(0 = blocking); streaming diloco only", "0 <= τ < inner_steps/fragments"),
        "mixing": ("α, after applying an average: local ← α·local + (1 − α)·global; streaming "
                   "diloco only", "0 <= α <= 1"),
        "wire_precision": ("outer gradients and averages on the wire, both ways; the math stays "
                           "fp32 (docs/algorithms.md#wire-codecs)", one_of(WIRE_PRECISIONS)),
        "eval_every": ("evaluate the global model every N outer steps (and after the last)",
                       ">= 1"),
        "eval_sequences": ("held-out sequences per evaluation", ">= 1"),
        "out_dir": ("where the run writes config, metrics, summary, plots and checkpoints; "
                    "empty = ./runs/<algorithm>-<timestamp>. It must be new or unused: a run "
                    "refuses a directory that holds another run or other files",
                    "an absolute path, or empty"),
        "overwrite": ("start even if out_dir holds another run: delete fl-diloco's outputs there "
                      "first (never other files)", "true | false"),
        "checkpoint_every": ("a resumable checkpoint every N outer steps and after the last "
                             "(0 = after the last only)", ">= 0"),
        "keep_checkpoints": ("how many of the newest resumable checkpoints to keep", ">= 1"),
        "resume": ("a run's out_dir: continue it from its newest checkpoint, or extend it with "
                   "rounds=N (empty = start fresh)", "an absolute path, or empty"),
        "tensorboard": ("also write the metrics as TensorBoard events under out_dir/tensorboard",
                        "true | false"),
        "outlier_norm_ratio": ("reject an outer gradient whose norm exceeds this × the round's "
                               "median (0 = no check)", "0, or > 1"),
        "max_reply_bytes": ("reject a reply larger than this (0 = twice what its outer gradient "
                            "needs, plus 64 KiB)", ">= 0"),
        "device": ("where the workers train: auto = CUDA when present, else CPU",
                   "auto | cpu | cuda | cuda:N"),
        "precision": ("what the inner forward/backward computes in: auto = bf16 autocast on a "
                      "CUDA device that supports it, else fp32; weights, AdamW and the outer "
                      "state stay fp32", one_of(COMPUTE_PRECISIONS)),
        "compile": ("torch.compile the worker's model (a first step that compiles for a while, "
                    "then faster steps)", "true | false"),
        "peak_flops": ("one worker's peak FLOP/s, for MFU (0 = the table of known GPUs in "
                       "fl_diloco/flops.py; CPUs have none)", ">= 0"),
        "threads_per_worker": ("torch CPU threads per worker (0 = the machine's cores / "
                               "num_clients)", ">= 0"),
        "server_threads": ("torch CPU threads of the server's evaluation and aggregation (0 = "
                           "the cores num_clients workers leave free on the server's machine, at "
                           "least 1: right when they share it; a coordinating site of its own "
                           "sets its cores)", ">= 0"),
        "ranks_per_worker": ("processes (one per GPU) that train one site's worker as a "
                             "torch.distributed group; the site's batch is ranks_per_worker × "
                             "batch_size sequences", ">= 1"),
        "parallelism": ("how a site's ranks split the model: ddp replicates it and all-reduces "
                        "gradients; fsdp (FSDP2) shards parameters, gradients and AdamW state",
                        one_of(PARALLELISMS)),
        "round_timeout": ("seconds a round waits for replies after the previous one closed; "
                          "then it closes with the replies it has", "> 0"),
        "startup_timeout": ("seconds the workers have to start (load the corpus, build the model) "
                            "and confirm θ(0); then the run stops, naming the nodes that did not "
                            "and quoting their worker logs", "> 0"),
        "node_wait_timeout": ("seconds the server waits for num_clients nodes to connect",
                              "> 0"),
        "worker_idle_timeout": ("seconds a worker process lives without a request, then exits "
                                f"(0 = {IDLE_ROUND_TIMEOUTS} × round_timeout); it also leaves once "
                                "a newer run starts on its machine and its own run has sent it "
                                "nothing for a round_timeout", ">= 0"),
    }


# Short names for the presets a CPU user reaches for first.
MODEL_ALIASES = {"tiny": "tiny-1m", "small": "tiny-10m"}

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Accept a value of the field's type, or a string of it (CLI and Flower run config)."""
    target = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    if target is str:
        return str(value)
    if target is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).strip().lower()]
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if not isinstance(value, bool):  # True is an int to Python, never a count or a rate here
        try:
            number = target(value)
            # 2.0 may stand for 2, but 2.5 must not be truncated into an int field.
            if target is float or not isinstance(value, float) or value.is_integer():
                return number
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{key} must be of type {target.__name__}, got {value!r}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}='{value}' is not allowed; choose one of: {', '.join(allowed)}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def staleness(algorithm: str, delay: int) -> int:
    """d: how many outer steps old the average applied at a sync is (0: diloco waits for it)."""
    return delay if algorithm in LATE_ALGORITHMS else 0


def resolve_precision(precision: str, device: str) -> str:
    """Map `auto` to bf16 on a CUDA device that supports it, else fp32."""
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_device(device: str) -> str:
    """Map `auto` to CUDA when present; reject an explicit CUDA request on a CPU machine."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device='{device}' but CUDA is not available here; use device=auto or cpu")
    return device


DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RunConfig)}
