"""Checkpoints: safetensors weights plus the run and model config, written atomically, and
the resumable training checkpoints the server writes every `checkpoint_every` outer steps.

`load_checkpoint(path)` is the one documented way back to a model:

    from fl_diloco.checkpoint import load_checkpoint
    model, run_config = load_checkpoint("runs/diloco-.../checkpoint")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fl_diloco.atomic import atomic_write
from fl_diloco.config import ConfigError, RunConfig
from fl_diloco.model import ModelConfig, Transformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_checkpoint(directory: str | Path, params: dict[str, torch.Tensor], run_config: RunConfig,
                    model_config: ModelConfig, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().float().cpu().contiguous() for n, t in params.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda fh: fh.write(save(tensors)))
    meta = {"run_config": run_config.to_dict(), "model_config": dataclasses.asdict(model_config),
            **(extra or {})}
    atomic_write(directory / CONFIG_NAME, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return directory


def load_checkpoint(directory: str | Path, device: str = "cpu") -> tuple[Transformer, RunConfig]:
    """Rebuild the model saved under `directory` and the run config that trained it."""
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not an fl-diloco checkpoint")
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
        model = Transformer(ModelConfig(**meta["model_config"]))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    except Exception as err:
        raise ValueError(f"checkpoint {directory} is corrupt or incompatible: {err}") from err
    return model.to(device), RunConfig.from_mapping(meta["run_config"])


# ---------------------------------------------------------------------------------------------
# Resumable training checkpoints: out_dir/checkpoints/round-<r>/
#
# Written every `checkpoint_every` outer steps and always after the final round, so that every
# finished run can be extended (fl_diloco/resume.py). Each holds the model as above (so it
# loads and exports like the final one) plus the outer loop's state (outer_state.safetensors:
# θ, outer momentum, the averages still in flight) and state.json (round, tokens, round
# history, RNG, data positions, and the SHA-256 of every file).
# A checkpoint is written into a temporary directory and renamed into place, so a crash leaves
# either the whole checkpoint or none of it; the newest `keep` are kept.

CHECKPOINTS_DIR = "checkpoints"
OUTER_STATE_NAME = "outer_state.safetensors"
STATE_NAME = "state.json"
_ROUND_PREFIX = "round-"


class CheckpointError(ConfigError):
    """A training checkpoint is missing, corrupt or does not fit the run; names the file.
    A ConfigError: the user fixes it (a path, a key, a checkpoint to move aside)."""


@dataclasses.dataclass
class TrainingState:
    round: int  # the last Flower round the checkpoint includes
    outer_tensors: dict[str, torch.Tensor]
    meta: dict  # state.json: tokens_total, strategy metadata, rng, data positions, ...
    path: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_training_checkpoint(out_dir: Path, server_round: int, params: dict[str, torch.Tensor],
                             outer_tensors: dict[str, torch.Tensor], meta: dict,
                             run_config: RunConfig, model_config: ModelConfig, keep: int) -> Path:
    """Write round `server_round`'s checkpoint atomically and prune all but the newest `keep`."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_ROUND_PREFIX}{server_round:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_checkpoint(staging, params, run_config, model_config, extra={"round": server_round})
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in outer_tensors.items()}
        atomic_write(staging / OUTER_STATE_NAME, lambda fh: fh.write(save(tensors)))
        files = {name: _sha256(staging / name) for name in (WEIGHTS_NAME, CONFIG_NAME, OUTER_STATE_NAME)}
        state = {"round": server_round, **meta, "sha256": files}
        atomic_write(staging / STATE_NAME, lambda fh: fh.write(json.dumps(state).encode()))
        if final.exists():  # the same round written again (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in training_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def training_checkpoints(out_dir: str | Path) -> list[Path]:
    """The run's complete training checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_ROUND_PREFIX))


def load_training_checkpoint(out_dir: str | Path) -> TrainingState:
    """The newest training checkpoint of the run in `out_dir`, verified file by file."""
    found = training_checkpoints(out_dir)
    if not found:
        raise CheckpointError(f"no training checkpoint under {Path(out_dir) / CHECKPOINTS_DIR}: the run "
                              f"wrote none (checkpoint_every=0, or it stopped before the first one)")
    path = found[-1]
    others = f" Older checkpoints: {', '.join(p.name for p in found[:-1])}." if len(found) > 1 else ""
    state_file = path / STATE_NAME
    try:
        state = json.loads(state_file.read_text())
        expected = state["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{state_file} is unreadable or corrupt ({err}).{others}") from None
    for name, digest in expected.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(f"{file} is missing, truncated or corrupt (its SHA-256 does not match "
                                  f"{state_file}). Move that checkpoint aside to resume from an older "
                                  f"one.{others}")
    try:
        outer = load_file(str(path / OUTER_STATE_NAME))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path / OUTER_STATE_NAME} cannot be read: {err}") from None
    return TrainingState(round=int(state["round"]), outer_tensors=outer, meta=state, path=path)
