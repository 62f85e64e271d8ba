"""Small-scale Table 2 of the eager-updates paper: every overlap variant on one token budget.

Each row is a real run (`fl-diloco train` with the row's overrides: a Flower simulation, or
the data-parallel baseline), on the default corpus and the tiny model, with M = 4 workers
and the same number of tokens for every row. For each row it reports the final eval loss,
its ratio to `diloco`'s, the bytes that really crossed the wire up and down, and the
workers' idle fraction (seconds spent waiting for an average / seconds existing).

Outputs, under --out-dir (default ./runs/overlap-ablation-H<H>):
  <row>/                 each run's own outputs (summary.json, metrics.jsonl, checkpoint, ...)
  table.md               the Markdown table (bytes summed over all workers and rounds; the
                         θ(0) each worker receives once at start is left out of "bytes down";
                         dp's bytes are modelled, see fl_diloco/dp_baseline.py)
  eval_loss_vs_tokens.png   one line per row
and, as the LAST line of stdout, one JSON object with every row's figures.

Rows whose summary.json already exists are read back instead of re-run (--fresh re-runs
them), so an interrupted ablation resumes where it stopped.

Usage:
    python bench/overlap_ablation.py                       # H = 30, 20 outer steps (~35 min on 2 cores)
    python bench/overlap_ablation.py --inner-steps 100 --rounds 6
    python bench/overlap_ablation.py --rows diloco,eager-d1 --rounds 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_diloco.cli import run_job  # noqa: E402
from fl_diloco.config import RunConfig  # noqa: E402
from fl_diloco.reporting import SUMMARY_NAME  # noqa: E402

# name → (the paper's row it stands for, overrides). Streaming uses P = 2: the tiny model
# has 2 blocks, and the paper's fragments are 3 blocks of much larger models.
ROWS: dict[str, tuple[str, dict]] = {
    "dp": ("data-parallel", {"algorithm": "dp"}),
    "diloco": ("none (DiLoCo)", {"algorithm": "diloco"}),
    "streaming": ("none (Streaming DiLoCo, P=2)", {"streaming": True, "fragments": 2}),
    "streaming-tau1": ("1 inner step (streaming, τ=1)",
                       {"streaming": True, "fragments": 2, "overlap_steps": 1}),
    "delayed": ("1 outer step, naive delayed", {"algorithm": "delayed"}),
    "delayed-low-lr": ("1 outer step, naive delayed, lower outer LR",
                       {"algorithm": "delayed", "outer_lr": 0.35}),
    "eager-d1": ("1 outer step, eager", {"algorithm": "eager", "delay": 1}),
    "eager-d2": ("2 outer steps, eager", {"algorithm": "eager", "delay": 2}),
    # Not in the paper's table: the same lower outer LR for diloco and eager, to tell the
    # delayed part of eager's update apart from the learning rate.
    "diloco-low-lr": ("none (DiLoCo), lower outer LR", {"algorithm": "diloco", "outer_lr": 0.35}),
    "eager-d1-low-lr": ("1 outer step, eager, lower outer LR",
                        {"algorithm": "eager", "delay": 1, "outer_lr": 0.35}),
    "diloco-fp4": ("none (DiLoCo), fp4 wire", {"algorithm": "diloco", "wire_precision": "fp4"}),
    "eager-d1-fp4": ("1 outer step, eager, fp4 wire",
                     {"algorithm": "eager", "delay": 1, "wire_precision": "fp4"}),
}


def run_row(name: str, base: dict, out_dir: Path, fresh: bool) -> dict:
    row_dir = out_dir / name
    summary_path = row_dir / SUMMARY_NAME
    if summary_path.exists() and not fresh:
        print(f"== {name}: reusing {summary_path}", flush=True)
        return json.loads(summary_path.read_text())
    # overwrite: a row run again (--fresh, or one that never finished) replaces its own directory.
    cfg = RunConfig.from_mapping({**base, **ROWS[name][1], "out_dir": str(row_dir), "overwrite": True})
    print(f"\n== {name}: {cfg.variant_label} ==", flush=True)
    began = time.perf_counter()
    summary = run_job(cfg)
    print(f"== {name}: done in {time.perf_counter() - began:.0f}s, final eval loss "
          f"{summary['final_eval_loss']:.4f}", flush=True)
    return summary


def idle_fraction(summary: dict) -> float | None:
    cu = summary.get("compute_utilization")
    return None if cu is None else 1.0 - cu


def rounds_bytes_down(summary: dict) -> int:
    """Bytes down during the rounds: without the one-off θ(0) every worker gets at start."""
    return summary["bytes_down"] - summary.get("setup_bytes_down", 0)


def table(rows: dict[str, dict], baseline: str) -> str:
    base_loss = rows[baseline]["final_eval_loss"] if baseline in rows else None
    lines = ["| row | overlap (paper's Table 2 row) | eval loss | ratio to diloco | bytes up | "
             "bytes down | idle fraction |",
             "|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        ratio = f"{s['final_eval_loss'] / base_loss:.4f}" if base_loss else "-"
        idle = idle_fraction(s)
        lines.append(f"| {name} | {ROWS[name][0]} | {s['final_eval_loss']:.4f} | {ratio} | "
                     f"{s['bytes_up'] / 1e6:.1f} MB | {rounds_bytes_down(s) / 1e6:.1f} MB | "
                     f"{'-' if idle is None else f'{idle:.3f}'} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, s in rows.items():
        history = s["eval_history"]
        ax.plot([h["tokens"] for h in history], [h["eval_loss"] for h in history], marker=".",
                label=f"{name} ({s['final_eval_loss']:.3f})",
                linestyle="--" if "fp4" in name else "-")
    ax.set_xlabel("training tokens (all workers)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    # The first evaluation (untrained model) dwarfs the differences that matter.
    finals = [s["final_eval_loss"] for s in rows.values()]
    ax.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20, help="outer steps (tokens = M·H·rounds·batch·seq)")
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--fresh", action="store_true", help="re-run rows that already have a summary")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    out_dir = (args.out_dir or Path("runs") / f"overlap-ablation-H{args.inner_steps}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Evaluate every outer step so the curves have points; the budget is the same for all rows.
    base = {"model": args.model, "num_clients": args.num_clients, "inner_steps": args.inner_steps,
            "rounds": args.rounds, "seed": args.seed, "eval_every": max(1, args.rounds // 10)}

    rows = {name: run_row(name, base, out_dir, args.fresh) for name in names}
    baseline = "diloco"
    title = f"{args.model}, M={args.num_clients}, H={args.inner_steps}, {args.rounds} outer steps"
    markdown = table(rows, baseline)
    (out_dir / "table.md").write_text(f"{title}\n\n{markdown}\n")
    plot(rows, out_dir / "eval_loss_vs_tokens.png", title)
    print(f"\n{title}\n\n{markdown}\n")
    print(f"table: {out_dir / 'table.md'}\nplot:  {out_dir / 'eval_loss_vs_tokens.png'}")

    base_loss = rows[baseline]["final_eval_loss"] if baseline in rows else None
    figures = {name: {"final_eval_loss": s["final_eval_loss"],
                      "ratio_to_diloco": s["final_eval_loss"] / base_loss if base_loss else None,
                      "tokens": s["tokens"], "bytes_up": s["bytes_up"], "bytes_down": rounds_bytes_down(s),
                      "idle_fraction": idle_fraction(s), "wall_seconds": s["wall_seconds"]}
               for name, s in rows.items()}
    print(json.dumps({"benchmark": "overlap_ablation", "model": args.model, "num_clients": args.num_clients,
                      "inner_steps": args.inner_steps, "rounds": args.rounds, "rows": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
