"""How much training throughput does running DiLoCo on Flower cost? (CPU benchmark)

Two ways of doing the same work (same model, same data shards, same M x R x H inner steps,
same outer Nesterov step) are timed in this one invocation:

(a) **Flower**: ``fl_diloco.simulation.simulate`` with ``algorithm=diloco``: an in-process
    Flower simulation (Ray), one ClientApp adapter per simulated SuperNode, each driving its
    node's persistent worker process over a Unix socket. Each worker runs with
    ``cpu_count // M`` torch threads (``clients.worker.worker_threads``), so the M workers
    train at the same time and share the cores. ``eval_every`` is set above ``rounds``, so
    only the server's final evaluation runs (the round-0 evaluation happens before the timed
    region starts).
(b) **Plain PyTorch**: the M ``InnerTrainer``s (``clients.worker.build_trainer``, built once,
    before the clock starts) run one after another in this process with ``os.cpu_count()``
    torch threads; after every round their outer gradients are averaged, the outer Nesterov
    step is taken (``strategies.outer_optimizer``) and the new parameters are loaded into
    every trainer. No Flower, no Ray, no extra processes, no serialization.

What is measured:

* Flower training throughput = tokens of rounds 1..R / time of rounds 1..R, taken from the
  run's ``metrics.jsonl`` (``wall_seconds`` of round R minus that of round 0). The server
  starts the workers and has them build their model and data before round 1 (as the plain
  side builds its trainers outside its clock), and the span INCLUDES the server's final
  evaluation in round R, which is not subtracted; the plain side runs no evaluation. The
  table also shows a "steady state" figure over rounds 2..R-1 (when R >= 3), which leaves
  the first and last rounds out, so you can see how much of the gap they make.
* Flower end-to-end wall time (Ray start, corpus load, initial eval, rounds, shutdown,
  checkpoint and plot) is reported separately and used in no ratio.
* Plain throughput = tokens / wall time of its loop.

How to read the result: ``ratio = flower_tokens_per_s / plain_tokens_per_s``. 1.0 means
Flower costs nothing; 0.9 means it costs 10 % of the throughput. The goal is ratio >= 0.9
on a 2-core CPU machine with the defaults. ``overhead_s_per_round`` is the extra wall time
per round that Flower takes (flower round time - plain wall / R). A ratio above 1 is
possible: M single-threaded workers in parallel can use small cores better than one
process with M threads running the trainers one after another. ``idle_per_worker_s`` is
the mean time a worker waits between sending its reply and getting the next round's
request (it includes waiting for the slower worker, server aggregation and message
passing; round 1 has no idle time by definition, so the mean is over rounds 2..R).

Absolute numbers depend on the machine and on whatever else shares its cores; both sides
run in the same invocation, so compare the ratio. On cores shared with other work the
plain side suffers most: one process with ``cpu_count`` torch threads slows down badly
whenever one of its threads is descheduled, while the Flower workers run one thread each.
The "fastest round" line (fastest plain round vs fastest Flower round among rounds
2..R-1, each with the same tokens) is the figure least disturbed by such load; if it and
the main ratio disagree a lot, the machine was busy, and the main ratio is not to be
trusted. The LAST line of stdout is one JSON object with the figures.

Usage:
    python bench/flower_overhead.py [--rounds 4 --inner-steps 50 --num-clients 2
                                     --model tiny --batch-size 8 --out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Runnable as `python bench/flower_overhead.py` from a checkout: put the repo root first.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clients.worker import build_trainer, worker_threads  # noqa: E402
from fl_diloco.config import RunConfig  # noqa: E402
from fl_diloco.reporting import METRICS_NAME  # noqa: E402
from strategies.outer_optimizer import WeightedAverage, nesterov_outer_step, zeros_like  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="outer rounds R (default 4)")
    p.add_argument("--inner-steps", type=int, default=50, help="inner steps H per round (default 50)")
    p.add_argument("--num-clients", type=int, default=2, help="workers M (default 2)")
    p.add_argument("--model", default="tiny", help="model preset or alias (default tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: RunConfig's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None,
                   help="where the Flower run writes (made absolute); default: a temp dir")
    p.add_argument("--plain-threads", type=int, default=None,
                   help="torch threads of the plain loop (default: os.cpu_count())")
    p.add_argument("--threads-per-worker", type=int, default=0,
                   help="torch threads per Flower worker (default 0: cpu_count // M)")
    p.add_argument("--skip-plain", action="store_true", help="time the Flower side only")
    p.add_argument("--skip-flower", action="store_true", help="time the plain side only")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, out_dir: str) -> RunConfig:
    values = {
        "algorithm": "diloco",
        "model": args.model,
        "num_clients": args.num_clients,
        "inner_steps": args.inner_steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "eval_every": args.rounds + 1,  # only the final evaluation runs
        "out_dir": out_dir,
        "overwrite": True,  # a rerun with the same --out-dir replaces this bench's own run
        "device": "cpu",
        "threads_per_worker": args.threads_per_worker,
    }
    if args.seq_len is not None:
        values["seq_len"] = args.seq_len
    return RunConfig.from_mapping(values)


# --------------------------------------------------------------------------- plain PyTorch
def run_plain(cfg: RunConfig, threads: int) -> dict:
    """The same M x R x H inner steps and R outer steps, one process, no Flower."""
    torch.set_num_threads(threads)
    m_count = cfg.num_clients
    setup_began = time.perf_counter()
    trainers = [build_trainer(cfg, m, m_count, "cpu") for m in range(m_count)]
    # Every trainer starts from the same seed, hence the same θ(0), as the server's model.
    params = trainers[0].parameters_fp32()
    momentum = zeros_like(params)
    setup_seconds = time.perf_counter() - setup_began

    tokens = 0
    round_seconds: list[float] = []
    compute_seconds: list[float] = []
    began = time.perf_counter()
    for _ in range(cfg.rounds):
        round_began = time.perf_counter()
        average = WeightedAverage()
        compute = 0.0
        for trainer in trainers:
            trainer.load_parameters(params)
            result = trainer.run_phase(cfg.inner_steps)
            average.add(result.outer_gradient, 1.0)  # uniform weighting, as configured
            tokens += result.tokens
            compute += result.compute_seconds
        nesterov_outer_step(params, average.result(), momentum, cfg.outer_lr, cfg.outer_momentum)
        round_seconds.append(time.perf_counter() - round_began)
        compute_seconds.append(compute)
    wall = time.perf_counter() - began
    return {
        "tokens": tokens,
        "wall_seconds": wall,
        "setup_seconds": setup_seconds,
        "round_seconds": round_seconds,
        "compute_seconds": compute_seconds,
        "threads": threads,
    }


# --------------------------------------------------------------------------- Flower
def run_flower(cfg: RunConfig) -> dict:
    from fl_diloco.simulation import simulate

    began = time.perf_counter()
    summary = simulate(cfg)
    end_to_end = time.perf_counter() - began

    records = [json.loads(line) for line in
               (Path(cfg.out_dir) / METRICS_NAME).read_text().splitlines() if line.strip()]
    by_round = {r["round"]: r for r in records}
    missing = [r for r in range(cfg.rounds + 1) if r not in by_round]
    if missing:
        raise RuntimeError(f"metrics.jsonl lacks rounds {missing}; see {cfg.out_dir}")
    rounds = [by_round[r] for r in range(1, cfg.rounds + 1)]
    walls = [by_round[r]["wall_seconds"] for r in range(cfg.rounds + 1)]
    per_round = []
    for r, rec in enumerate(rounds, start=1):
        per_round.append({
            "round": r,
            "wall": walls[r] - walls[r - 1],
            "tokens": rec["tokens"],
            "compute": rec["compute_seconds"],  # summed over workers
            "idle": rec["idle_seconds"],  # summed over workers
            "participants": rec["participants"],
            "rejected": rec.get("rejected", 0),
            "eval": rec.get("eval_loss") is not None,
        })
    return {
        "tokens": sum(r["tokens"] for r in per_round),
        "rounds_seconds": walls[-1] - walls[0],
        "setup_seconds": walls[0],  # run-log start to round-0 record (initial eval etc.)
        "end_to_end_seconds": end_to_end,
        "per_round": per_round,
        "summary": summary,
    }


# --------------------------------------------------------------------------- report
def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(cfg: RunConfig, flower: dict | None, plain: dict | None) -> dict:
    r_count, m_count = cfg.rounds, cfg.num_clients
    out: dict = {
        "rounds": r_count,
        "inner_steps": cfg.inner_steps,
        "num_clients": m_count,
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "flower_threads_per_worker": worker_threads(cfg),
        "plain_threads": plain["threads"] if plain else None,
    }
    plain_round = plain["wall_seconds"] / r_count if plain else None
    plain_tps = _rate(plain["tokens"], plain["wall_seconds"]) if plain else None

    if plain:
        print("\nplain PyTorch loop (this process, trainers run one after another)")
        print(f"  {'round':>5}  {'wall s':>8}  {'compute s':>9}")
        for i, (w, c) in enumerate(zip(plain["round_seconds"], plain["compute_seconds"]), start=1):
            print(f"  {i:>5}  {w:>8.2f}  {c:>9.2f}")
        print(f"  setup (build {m_count} trainers, not timed): {plain['setup_seconds']:.1f}s")

    if flower:
        print("\nFlower simulation, per round (from metrics.jsonl; compute/idle summed over workers)")
        print(f"  {'round':>5}  {'wall s':>8}  {'compute s':>9}  {'compute/worker':>14}  "
              f"{'idle/worker':>11}  {'wall - compute/worker':>21}  note")
        for r in flower["per_round"]:
            c_w = r["compute"] / max(1, r["participants"])
            i_w = r["idle"] / max(1, r["participants"])
            note = []
            if r["eval"]:
                note.append("includes final eval")
            if r["rejected"] or r["participants"] != m_count:
                note.append(f"participants {r['participants']}, rejected {r['rejected']}")
            print(f"  {r['round']:>5}  {r['wall']:>8.2f}  {r['compute']:>9.2f}  {c_w:>14.2f}  "
                  f"{i_w:>11.2f}  {r['wall'] - c_w:>21.2f}  {', '.join(note)}")
        print(f"  run-log start -> round-0 record (initial eval): {flower['setup_seconds']:.1f}s")
        print(f"  end to end, incl. Ray start, corpus load, shutdown, checkpoint, plot: "
              f"{flower['end_to_end_seconds']:.1f}s")

    flower_round = flower["rounds_seconds"] / r_count if flower else None
    flower_tps = _rate(flower["tokens"], flower["rounds_seconds"]) if flower else None
    ratio = flower_tps / plain_tps if flower_tps and plain_tps else None
    overhead = flower_round - plain_round if flower and plain else None

    idle_per_worker = None
    steady_tps = steady_ratio = None
    best_flower = best_plain = best_ratio = None
    if plain:
        best_plain = min(plain["round_seconds"])
    if flower:
        later = [r for r in flower["per_round"] if r["round"] >= 2]
        if later:
            idle_per_worker = sum(r["idle"] / max(1, r["participants"]) for r in later) / len(later)
        middle = [r for r in flower["per_round"] if 2 <= r["round"] <= r_count - 1]
        if middle:
            steady_tps = _rate(sum(r["tokens"] for r in middle), sum(r["wall"] for r in middle))
            steady_ratio = steady_tps / plain_tps if steady_tps and plain_tps else None
        if middle:
            best_flower = min(r["wall"] for r in middle)
            # Every round has the same tokens on both sides, so round times compare directly.
            best_ratio = best_plain / best_flower if best_plain and best_flower else None
        if flower["tokens"] != (plain["tokens"] if plain else flower["tokens"]):
            print(f"\nWARNING: token counts differ: flower {flower['tokens']}, plain {plain['tokens']}")

    rows = [
        ("work", f"M={m_count} x R={r_count} x H={cfg.inner_steps} steps, model {cfg.model}, "
                 f"batch {cfg.batch_size} x seq {cfg.seq_len}"),
        ("torch threads", f"flower {worker_threads(cfg)} per worker (x{m_count} in parallel), "
                          f"plain {out['plain_threads']}"),
        ("tokens", f"flower {flower['tokens'] if flower else '-'}, plain {plain['tokens'] if plain else '-'}"),
        ("flower rounds 1..R seconds", _f(flower["rounds_seconds"] if flower else None)
         + "  (incl. the final eval in round R)"),
        ("plain loop seconds", _f(plain["wall_seconds"] if plain else None)),
        ("flower tokens/s", _f(flower_tps, ".0f")),
        ("plain tokens/s", _f(plain_tps, ".0f")),
        ("ratio flower / plain", _f(ratio, ".3f") + "  (goal >= 0.9)"),
        ("round time flower / plain (s)", f"{_f(flower_round)} / {_f(plain_round)}"),
        ("flower overhead per round (s)", _f(overhead)),
        ("idle per worker per round (s)", _f(idle_per_worker) + "  (mean over rounds 2..R)"),
        ("steady state (rounds 2..R-1)", f"flower {_f(steady_tps, '.0f')} tokens/s, ratio "
                                         f"{_f(steady_ratio, '.3f')}  (no first round, no eval)"),
        ("fastest round flower / plain (s)", f"{_f(best_flower)} / {_f(best_plain)}, ratio "
                                             f"{_f(best_ratio, '.3f')}  (flower: rounds 2..R-1; "
                                             "least disturbed by other load)"),
        ("flower end-to-end seconds", _f(flower["end_to_end_seconds"] if flower else None)
         + "  (not used in the ratio)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nflower overhead benchmark")
    print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows), flush=True)

    out.update({
        "flower_tokens_per_s": flower_tps,
        "plain_tokens_per_s": plain_tps,
        "ratio": ratio,
        "overhead_s_per_round": overhead,
        "flower_round_s": flower_round,
        "plain_round_s": plain_round,
        "flower_rounds_seconds": flower["rounds_seconds"] if flower else None,
        "plain_seconds": plain["wall_seconds"] if plain else None,
        "idle_per_worker_s": idle_per_worker,
        "steady_flower_tokens_per_s": steady_tps,
        "steady_ratio": steady_ratio,
        "best_flower_round_s": best_flower,
        "best_plain_round_s": best_plain,
        "best_round_ratio": best_ratio,
        "end_to_end_seconds": flower["end_to_end_seconds"] if flower else None,
        "flower_timed_region": "rounds 1..R incl. the final eval (workers started before round 1)",
        "flower_per_round": [{k: r[k] for k in ("round", "wall", "compute", "idle")}
                             for r in flower["per_round"]] if flower else None,
        "out_dir": cfg.out_dir if flower else None,
    })
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.out_dir:
        out_dir = str(Path(args.out_dir).expanduser().resolve())
    else:
        out_dir = str(Path(tempfile.mkdtemp(prefix="fl-diloco-bench-")).resolve() / "flower")
    cfg = make_config(args, out_dir)
    plain_threads = args.plain_threads or os.cpu_count() or 1

    # Plain first: its trainers are freed before Ray starts, so the sides do not overlap.
    plain = None if args.skip_plain else run_plain(cfg, plain_threads)
    flower = None if args.skip_flower else run_flower(cfg)
    result = report(cfg, flower, plain)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
