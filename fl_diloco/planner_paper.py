"""`fl-diloco plan --mode paper`: the papers' compute-utilization simulation, to compare with
their tables (Streaming DiLoCo §3.1 and its appendix; the eager-updates paper's Table 5).

The default planner (fl_diloco/planner.py, "steady state") answers a user's question: how
much bandwidth does a long run need? This module answers another one: what would the papers'
own simulator print? The two differ on purpose (docs/algorithms.md#compute-utilization).

The simulation, one set of assumptions for every method, H and model size
==========================================================================

* Compute is one in-order stream of nodes per inner step, the papers' DAG: for each of the L
  layers a forward node, a backward-activations node (none for the first layer) and a
  backward-weights node, 3L − 1 nodes of equal length T/(3L − 1), in the order
  F_1 … F_L, then BA_L, BW_L, BA_{L−1}, BW_{L−1}, …, BA_2, BW_2, BW_1. The papers' count of
  4L − 1 nodes adds the L outer-gradient reductions, which here are the layers' transfers.
* Only the link between the two datacenters is modelled: 2 replicas, so a ring all-reduce of
  S bits takes S / B on each side's full-duplex link; latency 0. One FIFO link: a transfer
  starts when its data is ready and every earlier transfer has finished.
* What crosses the link, per layer of N/L parameters (N nominal: 1e9, 1e10, 1e11):
    dp          every step, each layer's gradient (bf16), ready when its BW node ends;
    diloco      at every H-th step, each layer's outer gradient, ready when its BW node ends;
    streaming   fragments of 3 layers (strided, P = L/3); in each outer step fragment p
                syncs at step (p + 1)·⌊H/(P + 1)⌋ — the appendix's "every 11, 5 and 2 steps"
                for P = 8, 16, 36 at H = 100 — each layer's outer gradient again ready when
                its BW node of that step ends.
  Unquantized outer gradients are bf16 (16 bits/value), FP4 is 4 bits (no block scales).
* When a result is needed: the forward node of that layer τ_eff + 1 steps after the sync
  (blocking: the next step; `-inner<τ>`: τ steps later; `-eager<d>`: d·H steps later).
* The horizon is 2 outer steps (2·H inner steps; for dp, 2·100 steps), and the wall time is
  when the last compute node ends: communication still in flight then is not waited for.
  CU = compute time / wall time.
* A table cell is the largest point of the grid numpy.logspace(-1, 3, 50) Gbit/s at which CU
  is still below the target (so CU reaches it somewhere before the next grid point); printed
  to one decimal, as in the papers.

Why the short horizon matters: with eager updates the averages of the last outer step are
never waited for, so over 2 outer steps only the first step's syncs must arrive, within H
steps each, and they may use the link while the second step's queue up unheard. A long run
has to carry every outer step's bytes within H steps, forever: about B_full = bits per outer
step / (H·T), which is what the steady-state planner reports. The paper's eager figures are
therefore lower than what a long run needs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fl_diloco.planner import CU_TARGETS, Method, parse_method
from strategies.fragments import fragment_blocks

GRID_GBPS = tuple(10 ** (-1 + 4 * k / 49) for k in range(50))  # numpy.logspace(-1, 3, 50)
OUTER_STEPS_SIMULATED = 2
DP_STEPS_SIMULATED = 2 * 100  # dp has no H: the same horizon as the paper's H = 100 rows
LAYERS_PER_FRAGMENT = 3
PAPER_BITS = {"bf16": 16, "fp4": 4}  # the papers' payloads: FP4 without block scales


@dataclass(frozen=True)
class PaperModel:
    """A model of the papers' simulation: nominal size, layers, seconds per inner step."""

    params: float
    layers: int
    step_time: float


PAPER_MODELS = {
    "1b": PaperModel(1e9, 24, 0.1),
    "10b": PaperModel(1e10, 48, 0.8),
    "100b": PaperModel(1e11, 108, 4.9),
}


def sync_steps(method: Method, inner_steps: int, fragments: int, outer_steps: int) -> list[tuple[int, int]]:
    """(inner step counted from 1, fragment) of every sync within `outer_steps` outer steps."""
    if method.family == "diloco":
        return [((k + 1) * inner_steps, 0) for k in range(outer_steps)]
    spacing = inner_steps // (fragments + 1)
    if spacing < 1:
        raise ValueError(f"H = {inner_steps} is too short for {fragments} fragments: the "
                         f"appendix's spacing ⌊H/(P + 1)⌋ would be 0")
    return [(k * inner_steps + (p + 1) * spacing, p) for k in range(outer_steps) for p in range(fragments)]


def simulate_cu(model: PaperModel, method: Method | str, inner_steps: int, bits: float,
                bandwidth_gbps: float) -> float:
    """Compute utilization of the short simulated run described in the module docstring."""
    method = parse_method(method)
    L, T = model.layers, model.step_time
    node = T / (3 * L - 1)
    seconds_per_layer = model.params / L * bits / (bandwidth_gbps * 1e9)
    if method.family == "dp":
        steps = DP_STEPS_SIMULATED
        # sends[(step, layer)]: steps whose forward node of `layer` waits for what BW_layer sends
        sends = {(t, l): [t + 1] for t in range(1, steps + 1) for l in range(L)}
    else:
        steps = OUTER_STEPS_SIMULATED * inner_steps
        fragments = max(1, L // LAYERS_PER_FRAGMENT) if method.family == "streaming" else 1
        lag = method.overlap_steps(inner_steps) + 1
        held = fragment_blocks(L, fragments, "strided")
        sends = {}
        for t, p in sync_steps(method, inner_steps, fragments, OUTER_STEPS_SIMULATED):
            for l in held[p]:
                sends.setdefault((t, l), []).append(t + lag)
    needed: dict[tuple[int, int], float] = {}  # (step, layer) → when its forward may start
    now = link_free = 0.0
    for t in range(1, steps + 1):
        for l in range(L):
            now = max(now, needed.get((t, l), 0.0)) + node
        for l in reversed(range(L)):
            now += node * (2 if l > 0 else 1)  # BA_l (not for the first layer), then BW_l
            for due in sends.get((t, l), ()):
                link_free = max(now, link_free) + seconds_per_layer
                if due <= steps:
                    needed[due, l] = max(needed.get((due, l), 0.0), link_free)
    return steps * T / now


def paper_table(model: PaperModel, rows: Sequence[tuple[str, int, str]],
                targets: Sequence[float] = CU_TARGETS) -> list[list[float]]:
    """Cells for (method, H, precision) rows: the largest grid point where CU < target (0 if
    none, inf if all). CU rises with bandwidth, so one sweep of the grid serves every target."""
    table = []
    for method, inner_steps, precision in rows:
        curve = [simulate_cu(model, method, inner_steps, PAPER_BITS[precision], b) for b in GRID_GBPS]
        cells = []
        for target in targets:
            below = [b for b, cu in zip(GRID_GBPS, curve) if cu < target]
            cells.append(math.inf if len(below) == len(curve) else (below[-1] if below else 0.0))
        table.append(cells)
    return table


DEFAULT_ROWS = "dp,streaming,streaming-inner1:fp4,streaming-eager1:fp4"


def _row(text: str, inner_steps: int) -> tuple[str, int, str]:
    name, _, precision = text.partition(":")
    method = parse_method(name.strip()).name
    precision = precision.strip() or "bf16"
    if precision not in PAPER_BITS:
        raise ValueError(f"precision must be one of {', '.join(PAPER_BITS)}, got {precision!r}")
    return method, inner_steps, precision


def main(argv: list[str] | None = None) -> int:
    """`fl-diloco plan --mode paper ...`: the papers' table for one model and H."""
    p = argparse.ArgumentParser(prog="fl-diloco plan --mode paper",
                                description="Bandwidth (Gbit/s) for each CU target as the papers' "
                                            "simulation reports it (fl_diloco/planner_paper.py).")
    p.add_argument("--model", choices=PAPER_MODELS, default="1b",
                   help="the papers' model sizes: N, layers, seconds per step (default 1b)")
    p.add_argument("--inner-steps", type=int, default=100, help="H (default 100)")
    p.add_argument("--methods", default=DEFAULT_ROWS,
                   help=f"comma-separated METHOD[:bf16|fp4] (default {DEFAULT_ROWS})")
    p.add_argument("--targets", default="50,80,90,95,99", help="CU targets in %% (default 50,80,90,95,99)")
    try:
        args = p.parse_args(argv)
        if args.inner_steps < 1:
            p.error(f"--inner-steps must be >= 1, got {args.inner_steps}")
        rows = [_row(s, args.inner_steps) for s in args.methods.split(",") if s.strip()]
        targets = [float(s) / 100 for s in args.targets.split(",") if s.strip()]
        if not rows or not targets or not all(0 < t <= 1 for t in targets):
            p.error("--methods and --targets need at least one item each, targets in (0, 100]")
        model = PAPER_MODELS[args.model]
        table = paper_table(model, rows, targets)
    except SystemExit as stop:
        return int(stop.code or 0)
    except ValueError as err:
        print(f"fl-diloco plan --mode paper: error: {err}", file=sys.stderr)
        return 2
    print(f"paper mode: N = {model.params:.0e}, L = {model.layers}, T = {model.step_time} s, "
          f"2 replicas, H = {args.inner_steps}, fragments of {LAYERS_PER_FRAGMENT} layers, "
          f"{OUTER_STEPS_SIMULATED} outer steps simulated")
    print("\n| method | wire | " + " | ".join(f"CU {t:.0%}" for t in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    for (method, _, precision), cells in zip(rows, table):
        print(f"| {method} | {precision} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print("\nGbit/s: the largest point of numpy.logspace(-1, 3, 50) where CU is still below the "
          "target, as the papers' tables report it. For what a long run needs, use the default mode.")
    return 0
