"""The outer loop's math, as pure functions on named fp32 tensors (SPEC §1).

Everything the server (and, later, an eager worker) does to parameters goes through these
functions, so the sign convention and the Nesterov parameterisation are written exactly once:

    outer gradient   Δ_m = θ_start − θ_m,local        (start minus end: a descent direction
                                                       points the same way as a gradient)
    average          Δ   = Σ_m w_m Δ_m                 (Σ w_m = 1)
    Nesterov SGD     b ← μ·b + Δ ;  θ ← θ − η·(Δ + μ·b)   (torch.optim.SGD(nesterov=True))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = dict[str, torch.Tensor]


def outer_gradient(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor]) -> Tensors:
    """Δ = start − end, in fp32. Training moves θ downhill, so Δ points uphill like a gradient."""
    return {name: start[name].float() - end[name].float() for name in start}


def nesterov_outer_step(
    params: Tensors,
    outer_grad: Mapping[str, torch.Tensor],
    momentum_buffer: Tensors,
    lr: float,
    momentum: float,
) -> None:
    """Apply one outer Nesterov SGD step in place (params and momentum_buffer are updated).

    Matches torch.optim.SGD(nesterov=True, dampening=0) bit for bit on the same inputs,
    including its first step, where the buffer starts as a copy of the gradient: with a
    zero-initialised buffer b ← μ·0 + Δ = Δ, which is the same thing.
    """
    with torch.no_grad():
        for name, param in params.items():
            grad = outer_grad[name].to(param.dtype)
            buf = momentum_buffer[name]
            buf.mul_(momentum).add_(grad)
            param.sub_(grad.add(buf, alpha=momentum), alpha=lr)


def zeros_like(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {name: torch.zeros_like(t, dtype=torch.float32) for name, t in tensors.items()}


class WeightedAverage:
    """Running Σ w_m Δ_m / Σ w_m that holds one model-sized buffer, never M copies.

    Replies are folded in as they are validated, so server memory stays O(model size)
    however many clients a round has.
    """

    def __init__(self) -> None:
        self._sum: Tensors | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weights must be positive, got {weight}")
        if self._sum is None:
            self._sum = {name: t.float() * weight for name, t in tensors.items()}
        else:
            for name, t in tensors.items():
                self._sum[name].add_(t.float(), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> Tensors:
        if self._sum is None:
            raise ValueError("no outer gradient was added to the average")
        return {name: s / self.total_weight for name, s in self._sum.items()}
