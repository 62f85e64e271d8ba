"""Checkpoints: safetensors weights plus the run and model config, written atomically.

`load_checkpoint(path)` is the one documented way back to a model:

    from fl_diloco.checkpoint import load_checkpoint
    model, run_config = load_checkpoint("runs/diloco-.../checkpoint")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fl_diloco.atomic import atomic_write
from fl_diloco.config import RunConfig
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
