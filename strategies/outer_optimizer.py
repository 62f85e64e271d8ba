"""The outer loop's math, as pure functions on named fp32 tensors.

See docs/algorithms.md#outer-gradient-and-outer-optimizer and #eager-updates.

Everything the server (and, later, an eager worker) does to parameters goes through these
functions, so the sign convention and the Nesterov parameterisation are written exactly once:

    outer gradient   Δ_m = θ_start − θ_m,local        (start minus end: a descent direction
                                                       points the same way as a gradient)
    average          Δ   = Σ_m w_m Δ_m                 (Σ w_m = 1)
    Nesterov SGD     b ← μ·b + Δ ;  θ ← θ − η·(Δ + μ·b)   (torch.optim.SGD(nesterov=True))
    eager mix        Δ̃_m(t) = Δ(t−d) + w_m·(Δ_m(t) − Δ_m(t−d))   (eager updates)
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


def eager_outer_gradient(
    stale_average: Mapping[str, torch.Tensor],
    fresh_own: Mapping[str, torch.Tensor],
    stale_own: Mapping[str, torch.Tensor],
    weight: float,
) -> Tensors:
    """Δ̃_m(t) = Δ(t−d) + w_m·(Δ_m(t) − Δ_m(t−d)): the eager update worker m can apply now.

    It equals w_m·Δ_m(t) + Σ_{k≠m} w_k·Δ_k(t−d): the worker's own fresh contribution replaces
    its own stale one inside the stale average, so every contribution is applied exactly once
    on every worker. Subtracting Δ_m(t−d) is what makes that true; mixing with
    (M−1)/M·Δ(t−d) instead counts the worker's own stale term twice.
    With weight 0 this is the naive delayed update Δ(t−d).
    """
    return {name: stale_average[name].float() + weight * (fresh_own[name].float() - stale_own[name].float())
            for name in stale_average}


class OuterOptimizer:
    """Outer Nesterov SGD over a set of named parameters (one fragment, or the whole model).

    `params` are held by reference, so a server can give each fragment its own optimizer
    over views of one global parameter dict.
    """

    def __init__(self, params: Tensors, lr: float, momentum: float) -> None:
        self.params = params
        self.momentum_buffer = zeros_like(params)
        self.lr = lr
        self.momentum = momentum

    def step(self, outer_grad: Mapping[str, torch.Tensor]) -> None:
        nesterov_outer_step(self.params, outer_grad, self.momentum_buffer, self.lr, self.momentum)


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
