"""An independent, single-process reading of docs/algorithms.md: the oracle for the Flower runs.

Everything happens in one loop over inner steps, with all M workers in lockstep:

* round r = 1..R (R = T·P) syncs fragment p(r) = (r − 1) mod P after every worker has taken
  s(r) = r·H/P inner steps in total (docs/algorithms.md#rounds-and-schedule);
* staleness 0 (diloco, streamed or not): the average A(r) is applied τ = overlap_steps inner
  steps later (τ = 0: at once), then merged into the local copy with α = mixing;
* staleness d ≥ 1 (delayed, eager): the fragment's rule uses the outer gradients of round
  k = r − d·P, the one that synced the same fragment d syncs earlier (zero when k ≤ 0).

Nothing here is imported from `strategies/` (the code under test). The outer optimizer is
`torch.optim.SGD(nesterov=True)`, which *is* the outer optimizer's parameterisation; the inner loop
(AdamW on the worker's shard) is reused from `clients`, since it is not what is being tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from clients.worker import build_trainer
from fl_diloco.config import RunConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class ReferenceResult:
    global_params: Tensors  # θ (staleness 0, delayed) or the mean over workers of θ_m (eager)
    worker_outer_params: list[Tensors]  # θ_m, all fragments assembled
    worker_local_params: list[Tensors]  # each worker's model at the end
    averages: list[Tensors]  # A(r) for r = 1..R, only the names of fragment p(r)
    # Δ_{m,p(r)}(r) for r = 1..R (outer list) and m = 1..M (inner list); for the tests' sums.
    outer_gradients: list[list[Tensors]] = field(default_factory=list)


def fragment_names(param_names: list[str], num_fragments: int, pattern: str) -> list[list[str]]:
    """Split parameter names into P fragments of whole blocks (order of `param_names` kept).

    `blocks.{i}.…` belongs to block i. strided: block i → fragment i mod P; sequential: the
    blocks cut into P contiguous chunks by numpy.array_split. Every non-block parameter
    (embedding, final norm, head) lives in the last fragment, P − 1.
    """
    if num_fragments < 1:
        raise ValueError(f"num_fragments must be >= 1, got {num_fragments}")
    if pattern not in ("strided", "sequential"):
        raise ValueError(f"unknown fragment pattern {pattern!r}")

    def block_of(name: str) -> int | None:
        return int(name.split(".")[1]) if name.startswith("blocks.") else None

    blocks = [b for b in map(block_of, param_names) if b is not None]
    num_blocks = max(blocks) + 1 if blocks else 0
    if pattern == "strided":
        home = {i: i % num_fragments for i in range(num_blocks)}
    else:
        chunks = np.array_split(np.arange(num_blocks), num_fragments)
        home = {int(i): p for p, chunk in enumerate(chunks) for i in chunk}

    fragments: list[list[str]] = [[] for _ in range(num_fragments)]
    for name in param_names:
        block = block_of(name)
        fragments[num_fragments - 1 if block is None else home[block]].append(name)
    return fragments


def _outer_step(params: Tensors, optimizer: torch.optim.SGD, gradient: Tensors) -> None:
    """θ ← Outer(θ, g): torch's Nesterov SGD, b ← μ·b + g; θ ← θ − η·(g + μ·b)."""
    for name, param in params.items():
        param.grad = gradient[name].clone()
    optimizer.step()


def reference_run(cfg: RunConfig) -> ReferenceResult:
    if cfg.wire_precision != "fp32":
        raise ValueError(f"the reference is fp32 only, got wire_precision={cfg.wire_precision!r}")
    if cfg.algorithm not in ("diloco", "delayed", "eager"):
        raise ValueError(f"the reference covers diloco, delayed and eager, not {cfg.algorithm!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Flower workers run with threads_per_worker=1: bitwise comparable
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: RunConfig) -> ReferenceResult:
    M, P, S, d = cfg.num_clients, cfg.num_fragments, cfg.sync_interval, cfg.staleness
    R, tau, alpha = cfg.flower_rounds, cfg.overlap_steps, cfg.mixing
    w = [1.0 / M] * M  # uniform weights w_m = 1/M

    # Every trainer is built after torch.manual_seed(cfg.seed): all start from the same θ0.
    trainers = [build_trainer(cfg, m, M, "cpu") for m in range(M)]
    theta0 = trainers[0].parameters_fp32()
    fragments = fragment_names(list(theta0), P, cfg.fragment_pattern)
    if any(not names for names in fragments):
        raise ValueError(f"fragments={P} leaves a fragment with no parameters")

    # Each worker's outer parameters θ_{m,p} and its own outer optimizer per fragment
    # (streaming: each fragment has its own outer optimizer state; eager: θ_m, b_m).
    outer = [[{n: theta0[n].clone() for n in names} for names in fragments] for _ in range(M)]
    # torch refuses nesterov=True with μ = 0, where Nesterov is plain SGD anyway.
    optimizers = [[torch.optim.SGD(list(frag.values()), lr=cfg.outer_lr,
                                   momentum=cfg.outer_momentum, nesterov=cfg.outer_momentum > 0)
                   for frag in worker] for worker in outer]

    averages: list[Tensors] = []
    deltas: list[list[Tensors]] = []  # deltas[r − 1][m] = Δ_{m,p(r)}(r)
    pending: dict[int, tuple[int, Tensors]] = {}  # staleness 0: apply-at-step → (p, A)

    def set_local(m: int, values: Tensors) -> None:
        params = trainers[m].parameters_fp32()
        params.update(values)
        trainers[m].load_parameters(params)

    # Staleness 0 with τ > 0: the last round's average lands τ steps after the last sync.
    last_step = R * S + (tau if d == 0 else 0)
    for step in range(1, last_step + 1):
        for trainer in trainers:  # lockstep: every worker takes inner step `step`
            trainer.train_step()

        if step % S == 0 and step // S <= R:  # round r syncs at s(r) = r·H/P
            r = step // S
            p = (r - 1) % P
            names = fragments[p]
            locals_ = [trainers[m].parameters_fp32() for m in range(M)]
            # Δ_{m,p} = θ_{m,p} − θ_{m,p,local}: start minus end, fp32.
            delta = [{n: outer[m][p][n] - locals_[m][n] for n in names} for m in range(M)]
            # A(r) = Σ_m w_m Δ_{m,p}(r).
            average = {n: sum((w[m] * delta[m][n] for m in range(M)), torch.zeros_like(theta0[n]))
                       for n in names}
            averages.append(average)
            deltas.append(delta)

            if d == 0:
                # Streaming: the average is applied τ inner steps after the sync.
                pending[step + tau] = (p, average)
            else:
                k = r - d * P  # the round that synced fragment p d outer steps ago
                for m in range(M):
                    if cfg.algorithm == "delayed":
                        # Delayed: θ(t) = Outer(θ(t−1), Δ(t−d)), Δ(≤0) = 0.
                        step_grad = (averages[k - 1] if k >= 1
                                     else {n: torch.zeros_like(theta0[n]) for n in names})
                    else:
                        # Eager, first (definitional) line:
                        # Δ̃_m(t) = w_m·Δ_m(t) + Σ_{j≠m} w_j·Δ_j(t−d), Δ_j(≤0) = 0.
                        step_grad = {}
                        for n in names:
                            g = w[m] * delta[m][n]
                            if k >= 1:
                                for j in range(M):
                                    if j != m:
                                        g = g + w[j] * deltas[k - 1][j][n]
                            step_grad[n] = g
                    _outer_step(outer[m][p], optimizers[m][p], step_grad)
                    # "then phase t+1 starts from θ_m(t)": no merge needed (eager with streaming).
                    set_local(m, outer[m][p])

        if step in pending:
            p, average = pending.pop(step)
            for m in range(M):
                # θ_p ← Outer_p(θ_p, A(r)); identical on every worker.
                _outer_step(outer[m][p], optimizers[m][p], average)
                # θ_{m,p,local} ← α·θ_{m,p,local} + (1 − α)·θ_p (streaming merge).
                local = trainers[m].parameters_fp32()
                set_local(m, {n: alpha * local[n] + (1.0 - alpha) * outer[m][p][n]
                              for n in fragments[p]})
    assert not pending

    worker_outer = [{n: frag[n].clone() for frag in worker for n in frag} for worker in outer]
    worker_outer = [{n: params[n] for n in theta0} for params in worker_outer]  # θ0's name order
    if cfg.algorithm == "eager":
        # Eager workers disagree; the global parameters are their mean.
        global_params = {n: torch.stack([params[n] for params in worker_outer]).mean(0)
                         for n in theta0}
    else:
        global_params = {n: t.clone() for n, t in worker_outer[0].items()}
    return ReferenceResult(
        global_params=global_params,
        worker_outer_params=worker_outer,
        worker_local_params=[trainer.parameters_fp32() for trainer in trainers],
        averages=averages,
        outer_gradients=deltas,
    )
