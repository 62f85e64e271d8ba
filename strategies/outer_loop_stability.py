"""When does an overlapped outer loop diverge? The outer loop, linearised.

A model of one outer step, to reason about eager and naive delayed updates against DiLoCo:
the loss is a quadratic bowl with its minimum at 0, every worker starts a phase from the
same point θ and its H inner steps close a fraction c of the distance to the minimum, so
worker m's outer gradient is Δ_m = c·θ (start minus end). c is the one number that says how
much a phase achieves: small for a large model far from convergence (the papers' regime),
large for a tiny model on a small corpus, where a single phase does most of what there is
to do. The outer step, the eager mix and naive delay are then linear maps of the recent θs
and the momentum buffer, and the loop converges exactly when the spectral radius ρ of that
map is below 1; ρ is also the distance left after each outer step, so 1 − ρ is the loop's
speed.

The map is built by running the project's own outer-loop functions
(strategies/outer_optimizer.py) on one-element tensors, one basis vector at a time, so this
analyses the code's rule, not a re-typed copy of it.
"""

from __future__ import annotations

import numpy as np
import torch

from strategies.outer_optimizer import eager_outer_gradient, nesterov_outer_step

VARIANTS = ("diloco", "delayed", "eager")


def transition_matrix(variant: str, c: float, lr: float, momentum: float,
                      num_workers: int = 2, delay: int = 1) -> np.ndarray:
    """The linear map from (θ(t−1), …, θ(t−1−d), b(t−1)) to the same one outer step later.

    diloco applies the fresh average Δ(t) = c·θ(t−1); delayed applies Δ(t−d); eager applies
    Δ̃(t) = Δ(t−d) + (1/M)·(Δ_m(t) − Δ_m(t−d)), which with identical workers is
    (1/M)·Δ(t) + (1 − 1/M)·Δ(t−d).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    history = 1 if variant == "diloco" else delay + 1  # θ(t−1) … θ(t−1−d)
    size = history + 1  # + the momentum buffer
    matrix = np.zeros((size, size))
    for column in range(size):
        state = np.zeros(size)
        state[column] = 1.0
        thetas, buffer = state[:history], state[history]
        fresh = {"x": torch.tensor([c * thetas[0]], dtype=torch.float64)}
        if variant == "diloco":
            applied = fresh
        else:
            stale = {"x": torch.tensor([c * thetas[delay]], dtype=torch.float64)}
            weight = 1.0 / num_workers if variant == "eager" else 0.0
            applied = eager_outer_gradient(stale, fresh, stale, weight)
        params = {"x": torch.tensor([thetas[0]], dtype=torch.float64)}
        buffers = {"x": torch.tensor([buffer], dtype=torch.float64)}
        nesterov_outer_step(params, applied, buffers, lr, momentum)
        matrix[:, column] = [params["x"].item(), *thetas[:history - 1], buffers["x"].item()]
    return matrix


def spectral_radius(variant: str, c: float, lr: float, momentum: float,
                    num_workers: int = 2, delay: int = 1) -> float:
    """ρ of the outer loop: < 1 converges (the gap shrinks by ρ per outer step), > 1 diverges."""
    eigenvalues = np.linalg.eigvals(transition_matrix(variant, c, lr, momentum, num_workers, delay))
    return float(np.max(np.abs(eigenvalues)))


def largest_stable_fraction(variant: str, lr: float, momentum: float, num_workers: int = 2,
                            delay: int = 1, resolution: float = 1e-3) -> float:
    """The largest c in (0, 1] below which every c on a grid of `resolution` keeps ρ < 1.

    A grid, not a bisection: nothing guarantees that stability is monotone in c.
    """
    grid = np.arange(resolution, 1.0 + resolution / 2, resolution)
    for c in grid:
        if spectral_radius(variant, float(c), lr, momentum, num_workers, delay) >= 1.0:
            return float(c - resolution)
    return 1.0
