"""The eager-updates paper's Table 2, Figure 5 and Table 3, rerun at the papers' settings, 3 seeds.

Every row is a real run (`fl-diloco train` with the row's overrides: a Flower simulation, or
the data-parallel baseline) on the shipped corpus, and every row of a table trains on the same
token budget. What the papers state, and what we chose where they are silent or where this
machine cannot follow them (2 CPU cores, about an hour for the whole table):

  papers                                     here
  M = 2 replicas                             num_clients = 2
  H = 30 (Table 2, Table 3), H swept (Fig. 5) inner_steps = 30; Figure 5: H = 10, 30, 100
  outer Nesterov, momentum 0.9               outer_momentum = 0.9, outer_lr = 0.7 (DiLoCo's)
  lowered outer LR for naive delayed         outer_lr = 0.35 (half; the paper gives no value)
  thousands of outer steps, 35M-1B params    100 outer steps (3,000 inner steps per worker),
                                             the tiny preset (2 blocks, d_model 128) with a
                                             1,024-token vocabulary and 64-token sequences,
                                             0.69M parameters: the most outer steps an hour buys
  AdamW, warmup then cosine                  the same; warmup 100 of 3,000 inner steps
  Streaming DiLoCo: fragments of 3 layers    P = 2 fragments of one block each (levelled)

Groups (`--groups`, any subset, in this order by default):
  table2       DiLoCo, 1-inner-step overlap (τ = 1 on one fragment), naive delayed, naive
               delayed at the lowered outer LR, eager d = 1, eager d = 2, data-parallel
  table3       DiLoCo and Streaming DiLoCo (P = 2), each without overlap and with eager d = 1
  figure5      DiLoCo, naive delayed and eager d = 1 at H = 10, 30, 100, same tokens
  investigate  not in the papers: the outer LR (0.35, 1.0) and a third of the inner LR for
               DiLoCo and eager, and M = 4 at the same total tokens (DiLoCo, delayed,
               eager): what eager's gap depends on

Every run lives once under <out>/runs/<variant>-s<seed>/ (rows shared between groups run
once); each group is a directory of links to its runs, so `fl-diloco report <out>/<group>`
reads it like any sweep. The bench writes each group's report.md and plots through
`fl_diloco.report`, prints every row as mean ± std over seeds with its ratio to DiLoCo at the
same H and M (at the end, and at 10, 25, 50 and 75 % of the tokens: where a gap opens), checks
the paper's claims, and prints, as its LAST line, one JSON object.
Runs whose summary.json exists are read back, so an interrupted bench resumes where it stopped.

Usage:
    nice python bench/paper_table2.py                          # 3 groups, 3 seeds (~1.5 h quiet)
    python bench/paper_table2.py --groups table2 --seeds 0      # one seed of Table 2 (~12 min)
    fl-diloco report runs/paper-table2/table2                  # the report again, any time
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_diloco.cli import run_job  # noqa: E402
from fl_diloco.config import RunConfig  # noqa: E402
from fl_diloco.report import Job, Stat, report  # noqa: E402
from fl_diloco.reporting import SUMMARY_NAME  # noqa: E402
from strategies.outer_loop_stability import largest_stable_fraction, spectral_radius  # noqa: E402

# The settings every row shares (see the docstring for why each one).
SETTINGS: dict = {
    "model": "tiny", "vocab_size": 1024, "seq_len": 64, "batch_size": 8,
    "num_clients": 2, "inner_steps": 30, "warmup_steps": 100,
    "outer_lr": 0.7, "outer_momentum": 0.9,
    "eval_every": 10, "checkpoint_every": 0,
}
INNER_STEPS_PER_WORKER = 3000  # the token budget: M x 3,000 steps x 8 x 64 tokens
LOWER_OUTER_LR = 0.35


@dataclass(frozen=True)
class Variant:
    name: str          # directory name, unique across groups
    paper_row: str     # the paper's words for the row
    overrides: dict = field(default_factory=dict)

    def config(self, seed: int) -> dict:
        cfg = {**SETTINGS, **self.overrides, "seed": seed}
        cfg["rounds"] = INNER_STEPS_PER_WORKER * SETTINGS["num_clients"] // (cfg["inner_steps"] * cfg["num_clients"])
        return cfg


DILOCO = Variant("diloco", "no overlap (DiLoCo)", {"algorithm": "diloco"})
EAGER = Variant("eager-d1", "1 outer step, eager", {"algorithm": "eager", "delay": 1})
DELAYED = Variant("delayed", "1 outer step, naive delayed", {"algorithm": "delayed"})


def _at(variant: Variant, suffix: str, paper_row: str, **overrides) -> Variant:
    return Variant(f"{variant.name}-{suffix}", paper_row, {**variant.overrides, **overrides})


GROUPS: dict[str, list[Variant]] = {
    "table2": [
        DILOCO,
        # τ = 1 on a single fragment is DiLoCo whose average lands one inner step late.
        Variant("inner1", "1 inner step overlap",
                {"algorithm": "diloco", "streaming": True, "fragments": 1, "overlap_steps": 1}),
        DELAYED,
        _at(DELAYED, "low-lr", "1 outer step, naive delayed, lower outer LR", outer_lr=LOWER_OUTER_LR),
        EAGER,
        Variant("eager-d2", "2 outer steps, eager", {"algorithm": "eager", "delay": 2}),
        Variant("dp", "data-parallel", {"algorithm": "dp"}),
    ],
    "table3": [
        DILOCO,
        EAGER,
        Variant("streaming", "Streaming DiLoCo, no overlap",
                {"algorithm": "diloco", "streaming": True, "fragments": 2}),
        Variant("streaming-eager-d1", "Streaming DiLoCo, eager",
                {"algorithm": "eager", "delay": 1, "streaming": True, "fragments": 2}),
    ],
    "figure5": [
        _at(v, f"H{h}", f"{v.paper_row}, H={h}", inner_steps=h) if h != 30 else v
        for h in (10, 30, 100) for v in (DILOCO, DELAYED, EAGER)
    ],
    "investigate": [
        *(_at(v, f"lr{lr}", f"{v.paper_row}, outer LR {lr}", outer_lr=lr)
          for lr in (LOWER_OUTER_LR, 1.0) for v in (DILOCO, EAGER)),
        *(_at(v, "M4", f"{v.paper_row}, M=4", num_clients=4) for v in (DILOCO, DELAYED, EAGER)),
        # A third of the inner LR: each phase closes a smaller part of the distance left.
        *(_at(v, "inner-lr1e-3", f"{v.paper_row}, inner LR 1e-3", inner_lr=1e-3) for v in (DILOCO, EAGER)),
    ],
}


def run_once(variant: Variant, seed: int, runs_dir: Path) -> dict:
    out = runs_dir / f"{variant.name}-s{seed}"
    summary_path = out / SUMMARY_NAME
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cfg = RunConfig.from_mapping({**variant.config(seed), "out_dir": str(out), "overwrite": True})
    return run_job(cfg)


def link_group(group_dir: Path, runs_dir: Path, variants: list[Variant], seeds: list[int]) -> int:
    """The group as a sweep directory: numbered links to its finished runs, in row order;
    returns how many."""
    group_dir.mkdir(parents=True, exist_ok=True)
    for old in group_dir.iterdir():
        if old.is_symlink():
            old.unlink()
    number = 0
    for variant in variants:
        for seed in seeds:
            target = runs_dir / f"{variant.name}-s{seed}"
            if (target / SUMMARY_NAME).exists():
                (group_dir / f"{number:02d}-{variant.name}-s{seed}").symlink_to(os.path.relpath(target, group_dir))
                number += 1
    return number


def row_figures(variant: Variant, seeds: list[int], runs_dir: Path) -> dict | None:
    losses = []
    for seed in seeds:
        path = runs_dir / f"{variant.name}-s{seed}" / SUMMARY_NAME
        if path.exists():
            losses.append(json.loads(path.read_text())["final_eval_loss"])
    if not losses:
        return None
    stat = Stat.of(losses)  # the report's mean ± sample std, so the two tables agree
    mean, std = stat.mean, stat.std or 0.0
    return {"paper_row": variant.paper_row, "eval_loss_mean": mean, "eval_loss_std": std,
            "seeds": len(losses), "losses": losses, "config": variant.overrides}


# The DiLoCo row each row is compared with shares these settings: the same H for the papers'
# tables (so the lowered-LR row is compared with DiLoCo at the default LR, as in the paper),
# and every varied setting for the investigation.
COMPARED_AT = {"investigate": ("inner_steps", "num_clients", "outer_lr", "inner_lr")}
COMPARED_AT_DEFAULT = ("inner_steps",)


def diloco_of(variant: Variant, group: str) -> Variant | None:
    """The DiLoCo row a variant is compared with (see COMPARED_AT)."""
    keys = COMPARED_AT.get(group, COMPARED_AT_DEFAULT)
    want = variant.config(0)
    for candidate in (v for vs in GROUPS.values() for v in vs):
        have = candidate.config(0)
        if (have.get("algorithm") == "diloco" and not have.get("streaming")
                and all(have.get(k) == want.get(k) for k in keys)):
            return candidate
    return None


GAP_POINTS = (0.1, 0.25, 0.5, 0.75, 1.0)  # fractions of the token budget


def mean_eval_curve(variant: Variant, seeds: list[int], runs_dir: Path) -> dict[int, float]:
    """{tokens: eval loss, mean over the seeds that finished} at the evaluations all of them have."""
    histories = []
    for seed in seeds:
        out = runs_dir / f"{variant.name}-s{seed}"
        if (out / SUMMARY_NAME).exists():
            job = Job(out.name, "completed", summary=json.loads((out / SUMMARY_NAME).read_text()), out_dir=out)
            histories.append(dict(job.eval_history))
    if not histories:
        return {}
    shared = set.intersection(*(set(h) for h in histories))
    return {t: Stat.of([h[t] for h in histories]).mean for t in sorted(shared)}


def gap_over_training(variant: Variant, diloco: Variant, seeds: list[int], runs_dir: Path) -> dict[float, float]:
    """The row's mean eval loss over DiLoCo's at GAP_POINTS of the budget (the evaluation nearest
    each, the earlier on a tie; the untrained model's is left out, and a run with few evaluations
    repeats one): where a gap opens says more than where it ends."""
    row, base = mean_eval_curve(variant, seeds, runs_dir), mean_eval_curve(diloco, seeds, runs_dir)
    shared = sorted(t for t in set(row) & set(base) if t > 0)
    if not shared:
        return {}
    return {f: row[t] / base[t] for f in GAP_POINTS
            for t in [min(shared, key=lambda t: abs(t - f * shared[-1]))]}


def gap_table(gaps: dict[str, dict[float, float]]) -> str:
    lines = ["| row | " + " | ".join(f"{f:.0%} of tokens" for f in GAP_POINTS) + " |",
             "|---|" + "---|" * len(GAP_POINTS)]
    lines += [f"| {name} | " + " | ".join(f"{g[f]:.3f}" for f in GAP_POINTS) + " |"
              for name, g in gaps.items() if g]
    return "\n".join(lines)


def table(name: str, rows: dict[str, dict]) -> str:
    lines = [f"{name}", "", "| row | paper's row | eval loss (mean ± std) | seeds | ratio to DiLoCo |",
             "|---|---|---|---|---|"]
    for key, r in rows.items():
        ratio = f"{r['ratio_to_diloco']:.4f}" if r.get("ratio_to_diloco") else "-"
        lines.append(f"| {key} | {r['paper_row']} | {r['eval_loss_mean']:.4f} ± {r['eval_loss_std']:.4f} | "
                     f"{r['seeds']} | {ratio} |")
    return "\n".join(lines)


def claims(table2: dict[str, dict]) -> list[str]:
    """The paper's ordering, checked on the means; a missing row skips its check."""
    def ratio(key: str) -> float | None:
        return table2.get(key, {}).get("ratio_to_diloco")

    found = []
    e1, e2, delayed = ratio("eager-d1"), ratio("eager-d2"), ratio("delayed")
    if e1 is not None:
        found.append(f"eager d=1 within +2 % of DiLoCo: {'yes' if e1 <= 1.02 else 'NO'} ({(e1 - 1) * 100:+.1f} %)")
    if delayed is not None and e1 is not None:
        found.append(f"naive delayed clearly worse than eager d=1: {'yes' if delayed > e1 + 0.02 else 'NO'} "
                     f"({(delayed - 1) * 100:+.1f} % vs {(e1 - 1) * 100:+.1f} %)")
    if None not in (e1, e2, delayed):
        between = e1 <= e2 <= delayed
        found.append(f"eager d=2 between eager d=1 and naive delayed: {'yes' if between else 'NO'} "
                     f"({(e2 - 1) * 100:+.1f} %)")
    return found


STABILITY_ROWS = (("diloco", "diloco", 1), ("delayed", "delayed", 1), ("eager-d1", "eager", 1),
                  ("eager-d2", "eager", 2))
PHASE_FRACTIONS = (0.05, 0.2, 0.5)


def stability(num_clients: int, lr: float, momentum: float) -> dict[str, dict]:
    """The linearised outer loop at these settings: where each variant diverges, and how fast
    it converges when a phase closes a fraction c of the distance left."""
    return {name: {"largest_stable_c": largest_stable_fraction(variant, lr, momentum, num_clients, delay),
                   "rho": {c: spectral_radius(variant, c, lr, momentum, num_clients, delay)
                           for c in PHASE_FRACTIONS}}
            for name, variant, delay in STABILITY_ROWS}


def stability_table(rows: dict[str, dict]) -> str:
    lines = ["| variant | diverges above c | " + " | ".join(f"ρ at c = {c}" for c in PHASE_FRACTIONS) + " |",
             "|---|---|" + "---|" * len(PHASE_FRACTIONS)]
    for name, r in rows.items():
        above = "never" if r["largest_stable_c"] >= 1.0 else f"{r['largest_stable_c']:.2f}"
        lines.append(f"| {name} | {above} | " + " | ".join(f"{r['rho'][c]:.3f}" for c in PHASE_FRACTIONS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="table2,table3,figure5",
                        help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/paper-table2"))
    parser.add_argument("--only", default="", help="comma-separated row names: run only these this time")
    parser.add_argument("--skip", default="", help="comma-separated row names not to run this time "
                        "(finished runs of any row still count in the tables)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    out_dir = args.out_dir.resolve()
    runs_dir = out_dir / "runs"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    # Seed 0 of every group first, then the other seeds: a partial run is already one table.
    todo: list[tuple[Variant, int]] = []
    for seed in seeds:
        for group in groups:
            for variant in GROUPS[group]:
                wanted = variant.name in args.only.split(",") if args.only else variant.name not in args.skip.split(",")
                if wanted and (variant, seed) not in todo:
                    todo.append((variant, seed))
    for variant, _ in todo:  # every config must be valid before the first hour is spent
        RunConfig.from_mapping(variant.config(0))
    if args.dry_run:
        for variant, seed in todo:
            print(f"{variant.name}-s{seed}: {variant.config(seed)}")
        return 0

    began = time.perf_counter()
    for k, (variant, seed) in enumerate(todo, 1):
        started = time.perf_counter()
        summary = run_once(variant, seed, runs_dir)
        spent = time.perf_counter() - began
        print(f"[{k}/{len(todo)}] {variant.name} seed {seed}: eval loss {summary['final_eval_loss']:.4f} "
              f"({time.perf_counter() - started:.0f} s; {spent / 60:.1f} min so far, "
              f"~{spent / k * (len(todo) - k) / 60:.0f} min left)", flush=True)

    figures: dict[str, dict] = {}
    for group in groups:
        rows, gaps = {}, {}
        for variant in GROUPS[group]:
            r = row_figures(variant, seeds, runs_dir)
            diloco = diloco_of(variant, group)
            base = row_figures(diloco, seeds, runs_dir) if diloco else None
            if r is not None:
                r["ratio_to_diloco"] = r["eval_loss_mean"] / base["eval_loss_mean"] if base else None
                if base and diloco != variant:
                    r["ratio_over_training"] = gaps[variant.name] = gap_over_training(variant, diloco, seeds, runs_dir)
                rows[variant.name] = r
        figures[group] = rows
        if not link_group(out_dir / group, runs_dir, GROUPS[group], seeds):
            continue
        paths = report(out_dir / group)
        print(f"\n{table(group, rows)}\n\nreport: {paths['report']}")
        if any(gaps.values()):
            print(f"\nratio to DiLoCo over training (mean eval loss over seeds):\n{gap_table(gaps)}")
    loop = {lr: stability(SETTINGS["num_clients"], lr, SETTINGS["outer_momentum"])
            for lr in (SETTINGS["outer_lr"], LOWER_OUTER_LR)}
    for lr, rows in loop.items():
        print(f"\nThe linearised outer loop, M = {SETTINGS['num_clients']}, outer LR {lr}, "
              f"momentum {SETTINGS['outer_momentum']} (strategies/outer_loop_stability.py; ρ < 1 "
              f"converges, the gap shrinks by ρ per outer step):\n{stability_table(rows)}")
    found = claims(figures.get("table2", {}))
    if found:
        print("\nThe paper's claims, on these runs:\n" + "\n".join(f"- {c}" for c in found))
    print(json.dumps({"benchmark": "paper_table2", "settings": SETTINGS,
                      "inner_steps_per_worker": INNER_STEPS_PER_WORKER, "seeds": seeds,
                      "groups": figures, "claims": found, "linearised_outer_loop": loop}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
