"""A worker's inner loop: H AdamW steps on its own shard, state kept across outer steps.

`InnerTrainer` owns everything that must stay resident between rounds
(docs/algorithms.md#flower-constraints): the model, the AdamW state, the position in the
learning-rate schedule and the data stream. It knows nothing about Flower or sockets, so the same object runs inside the persistent worker
process, in the data-parallel baseline and in the single-process reference tests.

How a step runs on an accelerator (the `precision`, `micro_batch_size` and `compile` keys):
the forward and backward passes run under bf16 autocast when the precision is bf16, while the
weights, their gradients, the AdamW moments and everything outer stay fp32 (autocast casts
a weight to bf16 for each matmul; the loss's softmax runs in fp32 in the model). A step never
waits for the device: the batch is copied from pinned memory without blocking, the loss stays
on the device, and the caller reads the losses once per round (`synchronize` is the one
explicit wait). Gradients of `batch_size / micro_batch_size` micro-batches add up to the
full batch's gradient, since each micro-batch's mean loss is scaled by its share.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fl_diloco.atomic import atomic_write
from fl_diloco.config import RunConfig, resolve_precision
from fl_diloco.data import BatchStream
from fl_diloco.flops import device_peak_flops, model_flops_per_token
from fl_diloco.model import Transformer, load_parameters
from strategies.outer_optimizer import Tensors, outer_gradient

if TYPE_CHECKING:
    from clients.site import SiteGroup


def inner_lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate for inner step `step` (0-based): linear warmup, then cosine to a floor.

    The cosine spans the whole run's inner steps (rounds × H), not one phase: DiLoCo's inner
    optimizer is one long AdamW run that happens to be interrupted by outer steps. A run
    extended past its planned rounds (`lr_schedule_rounds` < rounds) stays at the floor.
    """
    total = cfg.lr_schedule_steps
    if step < cfg.warmup_steps:
        return cfg.inner_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.inner_lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.inner_lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_inner_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW (docs/algorithms.md#inner-optimizer); norms and 1-D weights get no weight decay.

    On CUDA it is the fused kernel (one launch for every parameter); elsewhere torch's default.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.inner_lr,
        betas=(cfg.beta1, cfg.beta2),
        **fused,
    )


def allow_tf32() -> None:
    """Let CUDA run fp32 matmuls and convolutions on TF32 tensor cores (process-wide)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


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

    def __init__(self, model: Transformer, stream: BatchStream, cfg: RunConfig, device: str,
                 site: SiteGroup | None = None):
        self.model = model.to(device)
        self.stream = stream
        self.site = site  # one rank of a site's group (clients/site.py), or None when alone
        self.cfg = cfg
        self.device = device
        self.on_cuda = device.startswith("cuda")
        if self.on_cuda:
            allow_tf32()
        self.precision = resolve_precision(cfg.precision, device)
        micro_batch_size = cfg.micro_batch_size or stream.batch_size
        if stream.batch_size % micro_batch_size:
            raise ValueError(f"micro_batch_size={micro_batch_size} does not divide the batch of "
                             f"{stream.batch_size} sequences")
        self.micro_batches = stream.batch_size // micro_batch_size
        # The compiled module shares `model`'s parameters, so outer updates written into them
        # reach it without a recompilation; everything else reads `model` itself.
        replicated = self.model
        if site is not None and site.sharded:  # FSDP2: parameters, gradients, AdamW state sliced
            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        elif site is not None:  # gradients all-reduced (mean) across the site's ranks
            on_gpu = [torch.device(device).index] if self.on_cuda else None
            replicated = DistributedDataParallel(self.model, device_ids=on_gpu)
        self.forward = torch.compile(replicated) if cfg.compile else replicated
        self.optimizer = make_inner_optimizer(self.model, cfg)
        self.step = 0  # inner steps taken so far in the whole run
        self.flops_per_token = model_flops_per_token(model.cfg, cfg.seq_len)
        self.peak_flops = device_peak_flops(device, cfg.peak_flops)

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
        state = self.optimizer.state_dict()
        # fsdp: this rank's slice, as plain tensors (the dicts are the optimizer's own: copy)
        state["state"] = {index: {k: v.to_local() if isinstance(v, DTensor) else v
                                  for k, v in moments.items()}
                          for index, moments in state["state"].items()}
        torch.save({"step": self.step, "optimizer": state}, buffer)
        atomic_write(path, lambda fh: fh.write(buffer.getvalue()))

    def load_optimizer(self, path: Path) -> None:
        """Restore `save_optimizer`'s AdamW moments; the step must be the one saved."""
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if saved["step"] != self.step:
            raise ValueError(f"{path} holds the optimizer at inner step {saved['step']}, not {self.step}")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in saved["optimizer"]["state"].items():
            param = params[index]
            if isinstance(param, DTensor):  # fsdp: this rank's slice back into the sharded layout
                moments.update({k: DTensor.from_local(v, param.device_mesh, param.placements,
                                                      shape=param.shape, stride=param.stride())
                                for k, v in moments.items() if v.shape == param.to_local().shape
                                and v.dim()})
        self.optimizer.load_state_dict(saved["optimizer"])

    def train_step(self) -> torch.Tensor:
        """One inner AdamW step. Returns the batch's loss before the update as a 0-d tensor
        on the device: reading it waits for the step, so callers read losses in bulk."""
        inputs, targets = (self._to_device(t) for t in self.stream.next_batch())
        n = self.micro_batches
        if n == 1:
            loss = self._forward_backward(inputs, targets, 1)
        else:
            loss = torch.stack([self._forward_backward(x, y, n)
                                for x, y in zip(inputs.chunk(n), targets.chunk(n))]).mean()
        clip_and_step(self.model, self.optimizer, inner_lr_at(self.step, self.cfg),
                      self.cfg.grad_clip)
        self.step += 1
        if self.site is not None:  # the site's loss: the mean over every rank's rows
            dist.all_reduce(loss)
            loss = loss / self.site.ranks
        return loss

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:  # from page-locked memory the copy can overlap the running step
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                          micro_batches: int) -> torch.Tensor:
        """Add this (micro-)batch's share of the step's gradient to `.grad`; return its loss."""
        with autocast(self.precision, self.device):
            _, loss = self.forward(inputs, targets)
        (loss if micro_batches == 1 else loss / micro_batches).backward()
        return loss.detach()

    def synchronize(self) -> None:
        """Wait until the device has finished every step queued so far."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def run_phase(self, num_steps: int) -> PhaseResult:
        """Run `num_steps` inner steps from the current parameters and return Δ = start − end."""
        start = self.parameters_fp32()
        began = time.perf_counter()
        self.model.train()
        losses = torch.stack([self.train_step() for _ in range(num_steps)])
        self.synchronize()
        seconds = time.perf_counter() - began
        tokens = num_steps * self.stream.batch_size * self.cfg.seq_len
        return PhaseResult(
            outer_gradient=outer_gradient(start, self.parameters_fp32()),
            train_loss=mean_loss(losses),
            tokens=tokens,
            compute_seconds=seconds,
        )


def mean_loss(losses: torch.Tensor) -> float:
    """The mean of a phase's step losses, read from the device in one transfer."""
    return losses.double().mean().item()
