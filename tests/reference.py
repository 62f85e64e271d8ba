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
from fractions import Fraction

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
    averages: list[Tensors]  # A(r) for r = 1..R, only the keys of fragment p(r)
    # Δ_{m,p(r)}(r) for r = 1..R (outer list) and m = 1..M (inner list); for the tests' sums.
    outer_gradients: list[list[Tensors]] = field(default_factory=list)


def fragment_names(param_shapes: dict[str, tuple[int, ...]], num_fragments: int,
                   pattern: str) -> list[list[str]]:
    """Split parameters into P fragments, read from docs/algorithms.md#streaming-diloco.

    `blocks.{i}.…` belongs to block i. strided: block i → fragment i mod P; sequential: the
    blocks cut into P contiguous chunks by numpy.array_split. The other parameters, in model
    order, form one stream of rows (dim 0); with b_p the elements of fragment p's blocks and N
    the stream's, the level is W = min over k of (N + sum of the k smallest b_p) / k, fragment p's
    share is max(0, W − b_p), and fragment p takes the stream from the end of p − 1's share to
    the row boundary nearest the sum of the shares up to p (lower on a tie). Keys: the name,
    or `name[a:b]` for rows a..b−1 when a fragment holds part of a tensor.
    """
    if num_fragments < 1:
        raise ValueError(f"num_fragments must be >= 1, got {num_fragments}")
    if pattern not in ("strided", "sequential"):
        raise ValueError(f"unknown fragment pattern {pattern!r}")
    names = list(param_shapes)
    if num_fragments == 1:
        return [names]

    def block_of(name: str) -> int | None:
        return int(name.split(".")[1]) if name.startswith("blocks.") else None

    def numel(name: str) -> int:
        return int(np.prod(param_shapes[name]))

    num_blocks = 1 + max(b for b in map(block_of, names) if b is not None)
    if pattern == "strided":
        home = {i: i % num_fragments for i in range(num_blocks)}
    else:
        chunks = np.array_split(np.arange(num_blocks), num_fragments)
        home = {int(i): p for p, chunk in enumerate(chunks) for i in chunk}
    b = [sum(numel(n) for n in names if block_of(n) is not None and home[block_of(n)] == p)
         for p in range(num_fragments)]
    stream = [n for n in names if block_of(n) is None]
    total = sum(numel(n) for n in stream)
    smallest = sorted(b)
    level = min(Fraction(total + sum(smallest[:k]), k) for k in range(1, num_fragments + 1))
    shares = [max(Fraction(0), level - bp) for bp in b]

    def nearest_row_boundary(position: Fraction) -> tuple[int, int]:
        """(tensor index in `stream`, row) of the boundary nearest `position`, lower on a tie."""
        offset = Fraction(0)
        for i, name in enumerate(stream):
            rows, row = param_shapes[name][0], Fraction(numel(name), param_shapes[name][0])
            if position <= offset + numel(name):
                exact = (position - offset) / row
                low = int(exact)  # floor: exact >= 0
                return i, low if exact - low <= Fraction(1, 2) else low + 1
            offset += numel(name)
        return len(stream) - 1, param_shapes[stream[-1]][0]

    cuts = [(0, 0)] + [nearest_row_boundary(sum(shares[:p + 1])) for p in range(num_fragments - 1)]
    cuts.append((len(stream) - 1, param_shapes[stream[-1]][0]))
    held: dict[str, list[tuple[int, str]]] = {n: [] for n in stream}
    for p in range(num_fragments):
        (i0, r0), (i1, r1) = cuts[p], cuts[p + 1]
        for i in range(i0, i1 + 1):
            name, rows = stream[i], param_shapes[stream[i]][0]
            first, last = (r0 if i == i0 else 0), (r1 if i == i1 else rows)
            if first < last:
                held[name].append((p, name if (first, last) == (0, rows) else f"{name}[{first}:{last}]"))

    fragments: list[list[str]] = [[] for _ in range(num_fragments)]
    for name in names:
        block = block_of(name)
        if block is not None:
            fragments[home[block]].append(name)
        for p, key in held.get(name, []):
            fragments[p].append(key)
    return fragments


def take(tensors: Tensors, key: str) -> torch.Tensor:
    """The tensor a fragment key names: the whole parameter, or a view of rows a..b−1."""
    if key.endswith("]"):
        name, rows = key[:-1].split("[")
        first, last = map(int, rows.split(":"))
        return tensors[name][first:last]
    return tensors[key]


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
    fragments = fragment_names({n: tuple(t.shape) for n, t in theta0.items()}, P, cfg.fragment_pattern)
    if any(not names for names in fragments):
        raise ValueError(f"fragments={P} leaves a fragment with no parameters")

    # Each worker's outer parameters θ_{m,p} and its own outer optimizer per fragment
    # (streaming: each fragment has its own outer optimizer state; eager: θ_m, b_m).
    outer = [[{k: take(theta0, k).clone() for k in keys} for keys in fragments] for _ in range(M)]
    # torch refuses nesterov=True with μ = 0, where Nesterov is plain SGD anyway.
    optimizers = [[torch.optim.SGD(list(frag.values()), lr=cfg.outer_lr,
                                   momentum=cfg.outer_momentum, nesterov=cfg.outer_momentum > 0)
                   for frag in worker] for worker in outer]

    averages: list[Tensors] = []
    deltas: list[list[Tensors]] = []  # deltas[r − 1][m] = Δ_{m,p(r)}(r)
    pending: dict[int, tuple[int, Tensors]] = {}  # staleness 0: apply-at-step → (p, A)

    def set_local(m: int, values: Tensors) -> None:
        params = trainers[m].parameters_fp32()
        for key, value in values.items():
            take(params, key).copy_(value)
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
            delta = [{n: outer[m][p][n] - take(locals_[m], n) for n in names} for m in range(M)]
            # A(r) = Σ_m w_m Δ_{m,p}(r).
            average = {n: sum((w[m] * delta[m][n] for m in range(M)), torch.zeros_like(outer[0][p][n]))
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
                                     else {n: torch.zeros_like(outer[m][p][n]) for n in names})
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
                set_local(m, {n: alpha * take(local, n) + (1.0 - alpha) * outer[m][p][n]
                              for n in fragments[p]})
    assert not pending

    worker_outer = [{n: t.clone() for n, t in theta0.items()} for _ in range(M)]
    for assembled, worker in zip(worker_outer, outer):  # the fragments' keys back into whole tensors
        for frag in worker:
            for key, value in frag.items():
                take(assembled, key).copy_(value)
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
