"""Both planner modes against the eager-updates paper's 1B table.

The table is in docs/algorithms.md#compute-utilization. Two modes:

* paper (fl_diloco/planner_paper.py): the papers' own short simulation, a DAG per inner step
  over 2 outer steps, cells read off the paper's bandwidth grid. The goal: every cell within
  25 %, most of them the paper's exact grid point.
* steady state (fl_diloco/planner.py, the default for users): what a long run needs.

Between them, a model-free check of the paper's own cells: which of them no simulation of the
stated setup can produce with the stated payload (model_free_check says how).

The paper reports, for a 1B model (24 layers, 0.1 s per step, fragments of 3 layers), the
bandwidth in Gbit/s each method needs to reach 50/80/90/95/99 % compute utilization. Those
figures are hard-coded below as the reference; everything else comes from the planner, with
one set of assumptions for every row (see the planner's module docstring for why):

    N = 1e9 (nominal), L = 24 equal blocks, T = 0.1 s, M = 2 over a ring, latency 0, P = 8,
    data-parallel and unquantized streaming in bf16, FP4 counted as 4 bits per value.

Printed: one line per cell (predicted, predicted snapped to the paper's bandwidth grid,
paper, relative error), a Markdown table, each row's implied bits per value and shape
error, two sensitivity variants, a verdict on the goal (every cell within 25 %), the reasons
for the misses, and as the LAST line one JSON object with all figures.

Usage:
    .venv/bin/python bench/planner_vs_paper.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_diloco.planner import CU_TARGETS, Workload, bandwidth_for_cu, bits_per_value
from fl_diloco.planner_paper import GRID_GBPS, PAPER_BITS, PAPER_MODELS, paper_table

TOLERANCE = 0.25

# The paper's Gbit/s needed for CU 50 / 80 / 90 / 95 / 99 %, 1B model (reference values).
# name -> (label, planner method, H, precision, paper figures); "full" = the paper's
# unquantized wire format, which we infer to be bf16 (see evaluate's full_precision).
PAPER_1B = {
    "dp": ("Data-parallel", "dp", 100, "full", (86.8, 152.6, 184.2, 222.3, 569.0)),
    "streaming": ("Streaming DiLoCo", "streaming", 100, "full", (1.4, 5.2, 9.1, 16.0, 28.1)),
    "inner1-h30": ("Streaming, 1-inner-step overlap, FP4, H = 30", "streaming-inner1", 30,
                   "fp4", (2.4, 3.6, 4.3, 4.3, 4.3)),
    "inner1-h100": ("Streaming, 1-inner-step overlap, FP4, H = 100", "streaming-inner1", 100,
                    "fp4", (0.4, 0.9, 1.7, 2.0, 3.0)),
    "eager1-h30": ("Streaming, 1-outer-step overlap, FP4, H = 30", "streaming-eager1", 30,
                   "fp4", (1.1, 2.0, 2.0, 2.0, 2.4)),
    "eager1-h100": ("Streaming, 1-outer-step overlap, FP4, H = 100", "streaming-eager1", 100,
                    "fp4", (0.1, 0.2, 0.2, 0.2, 0.2)),
}

# The inferred setup of the paper's simulation (one for every row).
PAPER_WORKLOAD = Workload(params=1e9, layers=24, step_time=0.1, workers=2, inner_steps=100,
                          fragments=8, grad_precision="bf16", topology="ring",
                          fp4_scale_bits=0)

# Why a row misses, when it does (figures in braces are filled in from the run).
MISS_REASONS = {
    "inner1-h30": (
        "curve shape: the paper's row is nearly throughput-bound (B99/B50 = 1.8; planner "
        "{ratio:.1f}). At the paper's 50 % point, 2.4 Gbit/s, one FP4 fragment (0.5 Gbit) "
        "crosses in 0.21 s, less than the 0.375 s stall per sync a 50 % CU needs with a "
        "fragment every 3.75 steps, so no model in which compute waits only for its own late "
        "fragment gets that low. The row behaves like {bits:.1f} bits/value, i.e. as if the "
        "H = 30 simulation moved ~2-3x the FP4 payload (or hid less of it) than the H = 100 "
        "row, which this same model matches within 18 %."
    ),
    "eager1-h30": (
        "scale: eager is link-throughput bound (CU = B / B_full, shape matches within "
        "{shape:.0%}), but the paper needs {bits:.1f} bits/value where FP4 is 4."
    ),
    "eager1-h100": (
        "scale: the paper's 0.2 Gbit/s for 99 % CU is below the mean rate needed to move "
        "4 Gbit of FP4 outer gradients every 10 s (0.4 Gbit/s) at all: it implies {bits:.1f} "
        "bits/value. The paper's eager rows scale as ~1/H^2 (2.0 vs 0.2 Gbit/s for H = 30 vs "
        "100, x10), while any model where every bit crosses the link once per outer step "
        "scales as 1/H (x3.3); no single payload serves both rows, so the planner keeps the "
        "physical bound."
    ),
}


def on_grid(bandwidth: float) -> float:
    """The paper's reported figure for a true threshold: the largest point of its grid
    (planner_paper.GRID_GBPS, np.logspace(-1, 3, 50)) below it."""
    return max((g for g in GRID_GBPS if g < bandwidth * (1 - 1e-9)), default=0.0)


def evaluate_paper_mode() -> dict:
    """Every cell of PAPER_1B from the papers' simulation (planner_paper), one set of assumptions."""
    rows = [(method, h, "bf16" if precision == "full" else precision)
            for _label, method, h, precision, _paper in PAPER_1B.values()]
    table = paper_table(PAPER_MODELS["1b"], rows)
    cells = []
    for (name, (*_rest, paper)), predicted in zip(PAPER_1B.items(), table):
        for target, pred, ref in zip(CU_TARGETS, predicted, paper):
            cells.append({"row": name, "target_cu": target, "predicted_gbps": pred, "paper_gbps": ref,
                          "rel_error": pred / ref - 1,
                          # exact: the grid point the paper's printed figure stands for
                          "exact": pred == min(GRID_GBPS, key=lambda g: abs(g - ref))})
    errors = [abs(c["rel_error"]) for c in cells]
    return {"cells": cells, "max_abs_rel_error": max(errors),
            "within_25pct": sum(e <= TOLERANCE for e in errors),
            "exact": sum(c["exact"] for c in cells), "cells_total": len(cells),
            "model_free_impossible_cells": model_free_check()}


def model_free_check() -> list[dict]:
    """The paper's cells that no simulation of the stated setup can produce, whatever its DAG,
    schedule or horizon: only that the link is the one limit and works whenever it has data.

    A cell printed as b says CU(b) < target, b being a grid point. Two bounds, per sync period
    of C seconds of compute (T for dp, H·T otherwise) carrying S bits (every value once):

    * floor: compute never waits longer than the link is busy, so even with no overlap at all
      CU(b) >= C / (C + S/b). If that is >= target, the cell is impossible.
    * eager d >= 1: if the link clears an outer step's S bits within the outer step
      (S/b <= H·T), every transfer finishes within S/b of its release (a work-conserving link
      fed at most S bits per H·T is never busy longer than S/b at a stretch), so before the
      d·H steps after which its result is needed: nothing ever waits, CU(b) = 1 >= target.

    Each impossible cell also says the payload (bits per value) it would need to be possible.
    """
    model = PAPER_MODELS["1b"]
    found = []
    for name, (_label, method, h, precision, paper) in PAPER_1B.items():
        bits = PAPER_BITS["bf16" if precision == "full" else precision]
        period = model.step_time * (1 if method == "dp" else h)
        eager = "eager" in method
        for target, figure in zip(CU_TARGETS, paper):
            grid_point = min(GRID_GBPS, key=lambda g: abs(g - figure))
            seconds = model.params * bits / (grid_point * 1e9)  # one period's payload on the link
            floor = period / (period + seconds)
            never_waits = eager and seconds <= period
            if floor < target and not never_waits:
                continue
            # smallest payload for which neither bound rules the cell out
            need = grid_point * 1e9 * period * max(1 / target - 1, eager) / model.params
            found.append({"row": name, "target_cu": target, "paper_gbps": figure,
                          "grid_gbps": grid_point, "stated_bits_per_value": bits,
                          "cu_at_least": 1.0 if never_waits else floor,
                          "bits_per_value_needed": need})
    return found


PAPER_MODE_MISSES = (
    "the H = 30 rows need 1.5 to 3.5 times the bandwidth this simulation gives, at every "
    "target; at H = 100 the same methods match with the same FP4 payload. Five of the H = 30 "
    "cells cannot come from FP4 in any simulation where only the link limits (the model-free "
    "check below): they need 6 to 7.3 bits per value. No constant is tuned per row here."
)


def print_table(result: dict, spec: str) -> None:
    """Markdown: one row per method, each cell 'predicted vs paper (error)', misses marked."""
    print("| method (1B) | " + " | ".join(f"CU {t:.0%}" for t in CU_TARGETS) + " |")
    print("|---|" + "---|" * len(CU_TARGETS))
    for name, (label, *_rest) in PAPER_1B.items():
        cells = [c for c in result["cells"] if c["row"] == name]
        print(f"| {label} | " + " | ".join(
            f"{c['predicted_gbps']:{spec}} vs {c['paper_gbps']:g} ({c['rel_error']:+.0%})"
            + ("" if abs(c["rel_error"]) <= TOLERANCE else " MISS") for c in cells) + " |")


def print_paper_mode(result: dict) -> None:
    print("PAPER MODE (fl_diloco/planner_paper.py): the papers' simulation, 2 outer steps\n")
    print_table(result, ".1f")
    goal = result["within_25pct"] == result["cells_total"]
    print(f"\npaper mode: {result['within_25pct']}/{result['cells_total']} cells within 25 %, "
          f"{result['exact']} on the paper's exact grid point; max error "
          f"{result['max_abs_rel_error']:.0%}. Goal (every cell within 25 %): {'met' if goal else 'NOT met'}.")
    if not goal:
        print(f"  misses: {PAPER_MODE_MISSES}")
    impossible = result["model_free_impossible_cells"]
    print(f"\nmodel-free check (any DAG, schedule or horizon; only that a work-conserving link is "
          f"the one limit): {len(impossible)} of the paper's cells cannot hold for their stated payload")
    for c in impossible:
        print(f"  {c['row']:12s} CU {c['target_cu']:.0%} < target at {c['grid_gbps']:.2f} Gbit/s: with "
              f"{c['stated_bits_per_value']} bits/value CU is at least {c['cu_at_least']:.0%}; "
              f"possible only above {c['bits_per_value_needed']:.1f} bits/value")
    print("\n" + "-" * 72 + "\nSTEADY-STATE MODE (fl_diloco/planner.py, the default): what a long run needs\n")


def evaluate(base: Workload = PAPER_WORKLOAD, full_precision: str = "bf16") -> dict:
    """Predict every cell of PAPER_1B with `base` (H and precision set per row)."""
    cells, rows = [], {}
    for name, (label, method, h, precision, paper) in PAPER_1B.items():
        precision = full_precision if precision == "full" else precision
        workload = base.replace(inner_steps=h, precision=precision, grad_precision=precision)
        predicted = [bandwidth_for_cu(workload, method, t) for t in CU_TARGETS]
        ratios = [p / q for p, q in zip(paper, predicted)]
        scale = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        bits = bits_per_value(precision, workload.fp4_block_size, workload.fp4_scale_bits)
        rows[name] = {
            "label": label, "method": method, "inner_steps": h, "precision": precision,
            # payload that would best fit the row, and how far its shape is off after that
            "assumed_bits_per_value": bits,
            "implied_bits_per_value": bits * scale,
            "shape_error": max(abs(r / scale - 1) for r in ratios),
            "b99_over_b50_paper": paper[-1] / paper[0],
            "b99_over_b50_planner": predicted[-1] / predicted[0],
        }
        for target, pred, ref in zip(CU_TARGETS, predicted, paper):
            cells.append({
                "row": name, "target_cu": target, "predicted_gbps": pred,
                "predicted_on_grid_gbps": on_grid(pred), "paper_gbps": ref,
                "rel_error": pred / ref - 1, "rel_error_on_grid": on_grid(pred) / ref - 1,
            })
    errors = [abs(c["rel_error"]) for c in cells]
    return {
        "cells": cells,
        "rows": rows,
        "max_abs_rel_error": max(errors),
        "within_25pct": sum(e <= TOLERANCE for e in errors),
        "within_25pct_on_grid": sum(abs(c["rel_error_on_grid"]) <= TOLERANCE for c in cells),
        "cells_total": len(cells),
    }


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("max_abs_rel_error", "within_25pct", "within_25pct_on_grid",
                                   "cells_total")}


def main() -> int:
    paper_mode = evaluate_paper_mode()
    print_paper_mode(paper_mode)
    result = evaluate()
    w = PAPER_WORKLOAD
    print(f"planner vs paper, 1B: N={w.params:.3g}, L={w.layers}, T={w.step_time} s, "
          f"M={w.workers} ({w.topology}), P={w.fragments}, latency 0, fp4 = 4 bits\n")

    print(f"{'row':12s} {'CU':>4s} {'predicted':>10s} {'on grid':>9s} {'paper':>7s} "
          f"{'error':>7s}")
    for c in result["cells"]:
        mark = "ok" if abs(c["rel_error"]) <= TOLERANCE else "MISS"
        print(f"{c['row']:12s} {c['target_cu']:4.0%} {c['predicted_gbps']:10.3g} "
              f"{c['predicted_on_grid_gbps']:9.3g} {c['paper_gbps']:7.1f} "
              f"{c['rel_error']:+7.0%} {mark}")

    print()
    print_table(result, ".3g")

    print("\nper row: payload that would fit it best, and its shape error after that fit")
    for name, row in result["rows"].items():
        print(f"  {name:12s} implied {row['implied_bits_per_value']:5.2f} bits/value "
              f"(assumed {row['assumed_bits_per_value']:g}), shape error "
              f"{row['shape_error']:.0%}, B99/B50 paper {row['b99_over_b50_paper']:.1f} "
              f"planner {row['b99_over_b50_planner']:.1f}")

    sensitivity = {
        "fp4_with_block_scales_4.25_bits": _summary(evaluate(w.replace(fp4_scale_bits=32))),
        "our_1b_preset_1.28e9_params": _summary(evaluate(w.replace(params=1.28e9))),
        "unquantized_rows_in_fp32": _summary(evaluate(w, full_precision="fp32")),
    }
    print("\nsensitivity (cells within 25 % of 30):")
    for name, s in sensitivity.items():
        print(f"  {name:34s} {s['within_25pct']:2d}  (max error {s['max_abs_rel_error']:.0%})")

    missed_rows = sorted({c["row"] for c in result["cells"] if abs(c["rel_error"]) > TOLERANCE})
    goal = not missed_rows
    print(f"\nverdict: {result['within_25pct']}/{result['cells_total']} cells within 25 % "
          f"({result['within_25pct_on_grid']} after snapping to the paper's grid); max error "
          f"{result['max_abs_rel_error']:.0%}. Goal (every cell within 25 %): "
          f"{'met' if goal else 'NOT met'}.")
    reasons = {}
    for name in missed_rows:
        row = result["rows"][name]
        text = MISS_REASONS.get(name, "no specific diagnosis: shape error {shape:.0%}, implied "
                                      "{bits:.1f} bits/value").format(
            bits=row["implied_bits_per_value"], shape=row["shape_error"],
            ratio=row["b99_over_b50_planner"])
        reasons[name] = text
        print(f"  miss {name}: {text}")

    result.update(goal_met=goal, tolerance=TOLERANCE, miss_reasons=reasons,
                  sensitivity=sensitivity, paper_mode=paper_mode)
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
