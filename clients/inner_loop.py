"""A worker's inner loop: H AdamW steps on its own shard, state kept across outer steps.

`InnerTrainer` owns everything that must stay resident between rounds
(docs/algorithms.md#flower-constraints): the model, the AdamW state, the position in the
learning-rate schedule and the data stream. It knows nothing about Flower or sockets, so the same object runs inside the persistent worker
process, in the data-parallel baseline and in the single-process reference tests.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_diloco.atomic import atomic_write
from fl_diloco.config import RunConfig
from fl_diloco.data import BatchStream
from fl_diloco.model import Transformer, load_parameters
from strategies.outer_optimizer import Tensors, outer_gradient


def inner_lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate for inner step `step` (0-based): linear warmup, then cosine to a floor.

    The cosine spans the whole run's inner steps (rounds × H), not one phase: DiLoCo's inner
    optimizer is one long AdamW run that happens to be interrupted by outer steps.
    """
    total = cfg.total_inner_steps
    if step < cfg.warmup_steps:
        return cfg.inner_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.inner_lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.inner_lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_inner_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW (docs/algorithms.md#inner-optimizer); norms and 1-D weights get no weight decay."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.inner_lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                  grad_clip: float) -> None:
    """One optimizer step at `lr` after clipping the global gradient norm."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class PhaseResult:
    """What one phase of H inner steps produced."""

    outer_gradient: Tensors
    train_loss: float  # mean over the phase's steps
    tokens: int
    compute_seconds: float


class InnerTrainer:
    """A model, its AdamW state and its data stream, advanced H steps at a time."""

    def __init__(self, model: Transformer, stream: BatchStream, cfg: RunConfig, device: str):
        self.model = model.to(device)
        self.stream = stream
        self.cfg = cfg
        self.device = device
        self.optimizer = make_inner_optimizer(self.model, cfg)
        self.step = 0  # inner steps taken so far in the whole run

    def parameters_fp32(self) -> Tensors:
        """A detached fp32 copy of the parameters, on the CPU (what goes on the wire)."""
        return {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters()}

    def load_parameters(self, params: dict[str, torch.Tensor | np.ndarray]) -> None:
        load_parameters(self.model, params)

    def start_at(self, step: int) -> None:
        """Continue a run at inner step `step`: the learning-rate schedule and the data stream
        pick up where a worker that took `step` steps from the start would be."""
        self.step = step
        self.stream.seek(step)

    def save_optimizer(self, path: Path) -> None:
        """The AdamW moments at the current step, written atomically (for an exact resume)."""
        buffer = io.BytesIO()
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict()}, buffer)
        atomic_write(path, lambda fh: fh.write(buffer.getvalue()))

    def load_optimizer(self, path: Path) -> None:
        """Restore `save_optimizer`'s AdamW moments; the step must be the one saved."""
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if saved["step"] != self.step:
            raise ValueError(f"{path} holds the optimizer at inner step {saved['step']}, not {self.step}")
        self.optimizer.load_state_dict(saved["optimizer"])

    def train_step(self) -> float:
        """One inner AdamW step; returns the batch loss before the update."""
        inputs, targets = self.stream.next_batch()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        _, loss = self.model(inputs, targets)
        loss.backward()
        clip_and_step(self.model, self.optimizer, inner_lr_at(self.step, self.cfg),
                      self.cfg.grad_clip)
        self.step += 1
        return loss.item()

    def run_phase(self, num_steps: int) -> PhaseResult:
        """Run `num_steps` inner steps from the current parameters and return Δ = start − end."""
        start = self.parameters_fp32()
        began = time.perf_counter()
        self.model.train()
        losses = [self.train_step() for _ in range(num_steps)]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        tokens = num_steps * self.stream.batch_size * self.cfg.seq_len
        return PhaseResult(
            outer_gradient=outer_gradient(start, self.parameters_fp32()),
            train_loss=float(np.mean(losses)),
            tokens=tokens,
            compute_seconds=seconds,
        )
