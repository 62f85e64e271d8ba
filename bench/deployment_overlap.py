"""Is the overlap real in deployment? `diloco` against `eager` on a real SuperLink + SuperNodes,
measured, and predicted by the planner from the measured per-round overhead.

Starts a local deployment (`scripts/local_deployment.sh up --insecure M`: one SuperLink, M
SuperNodes, separate processes over loopback), submits the same run twice with `flwr run`,
as `diloco` and as `eager` (d = 1), H chosen for a phase of about 10 s, and stops exactly what
it started at the end.

Loopback moves the payload in milliseconds, so a `diloco` worker's idle seconds per round are
the deployment's own overhead per round O: the SuperNode polls the SuperLink every 3 s, its
SuperExec polls for work every 1 s, every message starts a fresh ClientApp process (importing
Flower alone costs ~2.5 s of CPU), the ServerApp polls for replies
(docs/algorithms.md#flower-constraints). For each run it prints each worker's compute and
idle seconds and compute utilization (CU = compute / (compute + idle)) from summary.json and
metrics.jsonl, next to the planner's prediction
(fl_diloco.planner.predict: Flower's star, unlimited bandwidth, the step time measured in
that run, and O as latency, i.e. O / sync_hops = O / 2 per hop). O comes from the `diloco`
run itself, so for `diloco` the prediction only checks the planner's arithmetic
(CU = H·T / (H·T + O)); for `eager` it is a prediction: the planner says eager hides O
completely while O is shorter than a phase.

Two CUs are shown. "run" is summary.json's, over every round. "steady" leaves out the first
2 + d rounds (d = 0 for diloco, 1 for eager): round 1 never waits, the next 1 + d wait for
averages whose requests went out only after the ServerApp's start-up (it evaluates θ(0) and
Flower starts the first ClientApps while the workers already train). Every remaining round
is one phase plus one wait, the steady state the planner models. The relative error is
measured / predicted - 1 on the steady CU.

Usage:
    python bench/deployment_overlap.py [--num-clients 2 --inner-steps 65 --rounds 6]

The LAST line of stdout is one JSON object with the figures. The helpers here are shared
with bench/rate_limited_links.py (the same runs behind rate-limited links).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fl_diloco.planner import Prediction, Workload, predict, sync_hops  # noqa: E402
from fl_diloco.reporting import METRICS_NAME, SUMMARY_NAME, compute_utilization  # noqa: E402

SCRIPT = ROOT / "scripts" / "local_deployment.sh"
CONNECTION = "fl-diloco-local-insecure"  # what `local_deployment.sh up --insecure` adds
METHODS = {"diloco": "diloco", "eager": "diloco-eager1"}  # run algorithm -> planner method
MIN_ROUNDS = 5  # eager's steady state starts at round 4 (see `measure`)


def submit_run(connection: str, out_dir: Path, run_config: dict[str, Any], env: dict[str, str],
               timeout: float) -> tuple[dict, list[dict]]:
    """`flwr run` one run on a running deployment; returns (summary.json, metrics.jsonl rows)."""
    summary_path = out_dir / SUMMARY_NAME
    summary_path.unlink(missing_ok=True)
    # overwrite: a rerun of the bench replaces its own earlier run in out_dir.
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
                    for k, v in {**run_config, "out_dir": str(out_dir)}.items()) + " overwrite=true"
    print(f"\n== flwr run . {connection} --run-config '{text}' --stream", flush=True)
    began = time.monotonic()
    subprocess.run(["flwr", "run", ".", connection, "--run-config", text, "--stream"],
                   cwd=ROOT, env=env, check=True, timeout=timeout)
    while not summary_path.exists():  # --stream may return before the ServerApp's last write
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"no {summary_path} after {timeout:.0f}s; see the deployment's logs")
        time.sleep(1)
    rows = [json.loads(line) for line in (out_dir / METRICS_NAME).read_text().splitlines() if line]
    return json.loads(summary_path.read_text()), rows


def measure(summary: dict, rows: list[dict], staleness: int) -> dict[str, Any]:
    """What a run measured: step time, per-round compute/idle, CU over the run and steady."""
    m, h, rounds = summary["num_clients"], summary["inner_steps"], summary["rounds"]
    steady = [r for r in rows if r.get("round", 0) > 2 + staleness and r.get("clients")]
    per_worker: dict[int, list[float]] = {}
    for row in steady:
        for client in row["clients"]:
            acc = per_worker.setdefault(int(client["partition_id"]), [0.0, 0.0])
            acc[0] += client["compute_seconds"]
            acc[1] += client["idle_seconds"]
    compute = sum(c for c, _ in per_worker.values())
    idle = sum(i for _, i in per_worker.values())
    worker_rounds = max(1, sum(len(r["clients"]) for r in steady))
    return {
        "step_time_s": summary["compute_seconds"] / (m * rounds * h),
        "phase_s": summary["compute_seconds"] / (m * rounds),
        "compute_s_per_worker_round": compute / worker_rounds,
        "idle_s_per_worker_round": idle / worker_rounds,
        "cu_run": summary["compute_utilization"],
        "cu_run_per_worker": [w["compute_utilization"] for w in summary["workers"]],
        "cu_steady": compute_utilization(compute, idle),
        "cu_steady_per_worker": [compute_utilization(c, i) for _, (c, i) in sorted(per_worker.items())],
        "steady_rounds": len(steady),
        "wall_s": summary["wall_seconds"],
        # from the ServerApp's log start to the close of the last round (no final checkpoint/plot)
        "train_wall_s": rows[-1]["wall_seconds"],
        "wire_bytes_up_per_sync": summary["bytes_up"] / (m * rounds),
        "final_eval_loss": summary["final_eval_loss"],
    }


def run_staleness(summary: dict) -> int:
    """d of the run: 0 for diloco, `delay` for eager."""
    from fl_diloco.config import staleness

    return staleness(summary["algorithm"], summary["config"]["delay"])


def round_overhead(unshaped_diloco: dict[str, Any]) -> float:
    """O: a `diloco` worker's mean idle seconds per steady round on an unshaped link."""
    return unshaped_diloco["idle_s_per_worker_round"]


def flower_workload(summary: dict, step_time: float) -> Workload:
    """The run as the planner sees it: its model, M, H and wire, Flower's star topology.

    Each SuperNode has its own link; the SuperLink's is not limited (server bandwidth inf).
    """
    from fl_diloco.planner import workload_from_preset

    cfg = summary["config"]
    workload = workload_from_preset(_preset(cfg["model"]), step_time, vocab_size=cfg["vocab_size"],
                                    seq_len=cfg["seq_len"], workers=summary["num_clients"],
                                    inner_steps=summary["inner_steps"], precision=cfg["wire_precision"],
                                    topology="star", server_bandwidth_gbps=math.inf)
    if workload.params != summary["num_parameters"]:
        raise RuntimeError(f"planner counts {workload.params:.0f} parameters for {cfg['model']}, the run "
                           f"{summary['num_parameters']}: the preset and the run disagree")
    return workload


def _preset(model: str) -> str:
    from fl_diloco.config import MODEL_ALIASES

    return MODEL_ALIASES.get(model, model)


def predict_run(algorithm: str, summary: dict, measured: dict, bandwidth_gbps: float,
                delay_s: float, overhead_s: float) -> Prediction:
    """The planner's CU and wall time for this run: measured T, configured link, measured O."""
    workload = flower_workload(summary, measured["step_time_s"])
    latency = delay_s + overhead_s / sync_hops(workload)
    return predict(workload, METHODS[algorithm], bandwidth_gbps, latency,
                   steps=summary["rounds"] * summary["inner_steps"])


def compare(measured: dict, predicted: Prediction) -> dict[str, Any]:
    return {
        **measured,
        "predicted_cu": predicted.cu,
        "predicted_wall_s": predicted.wall_seconds,
        "rel_error_cu_steady": measured["cu_steady"] / predicted.cu - 1,
        "rel_error_cu_run": measured["cu_run"] / predicted.cu - 1,
        "rel_error_wall": measured["train_wall_s"] / predicted.wall_seconds - 1,
    }


def overlap_gain(figures: dict[str, dict]) -> dict[str, float]:
    """What eager's CU bought in time, against diloco in the same bench run.

    CU counts the seconds a worker spends computing. On a few shared CPU cores the Flower work
    that eager overlaps (a fresh ClientApp process per message, serialization, the SuperNode's
    polling) runs on the cores the inner steps use and slows them, so a CU near 1 buys less wall
    time than CU_eager / CU_diloco suggests. With a GPU doing the steps, that work would not
    compete with them.
    """
    diloco, eager = figures["diloco"], figures["eager"]
    return {"cu_ratio": eager["cu_steady"] / diloco["cu_steady"],
            "wall_speedup": diloco["train_wall_s"] / eager["train_wall_s"],
            "step_time_ratio": eager["step_time_s"] / diloco["step_time_s"]}


def print_overlap_gain(gain: dict[str, float]) -> None:
    print(f"eager against diloco: {gain['cu_ratio']:.2f} x the steady CU, {gain['wall_speedup']:.2f} x "
          f"as fast to the last round (same H and rounds); its inner steps took "
          f"{gain['step_time_ratio']:.2f} x as long (the overlapped Flower work shares the CPU cores)")


def print_table(figures: dict[str, dict]) -> None:
    print("| variant | compute s / worker-round | idle s / worker-round | CU run (per worker) | "
          "CU steady (per worker) | predicted CU | error (steady) | wall s to last round | "
          "predicted wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        run_w = ", ".join(f"{c:.3f}" for c in f["cu_run_per_worker"])
        steady_w = ", ".join(f"{c:.3f}" for c in f["cu_steady_per_worker"])
        print(f"| {name} | {f['compute_s_per_worker_round']:.2f} | {f['idle_s_per_worker_round']:.2f} | "
              f"{f['cu_run']:.3f} ({run_w}) | {f['cu_steady']:.3f} ({steady_w}) | "
              f"{f['predicted_cu']:.3f} | {f['rel_error_cu_steady']:+.1%} | {f['train_wall_s']:.1f} | "
              f"{f['predicted_wall_s']:.1f} |")


def check_rounds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be >= {MIN_ROUNDS}: eager's first 3 rounds are start-up, and "
                     f"the steady state needs 2 more")


def deployment_env(state_variable: str, state_dir: Path) -> dict[str, str]:
    """The environment for a deployment script and `flwr`: its state dir, this Python's tools."""
    env = {**os.environ, state_variable: str(state_dir)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def base_run_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_clients": args.num_clients, "rounds": args.rounds, "eval_every": args.rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=65,
                        help="H; pick it for a phase of ~10 s (65 at ~150 ms per step)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "deployment-overlap")
    args = parser.parse_args(argv)
    check_rounds(parser, args)
    out_root = args.out_dir.resolve()
    env = deployment_env("FL_DILOCO_DEPLOYMENT_DIR", out_root / "deployment")

    subprocess.run([str(SCRIPT), "up", "--insecure", str(args.num_clients)], cwd=ROOT, env=env, check=True)
    try:
        runs = {}
        for algorithm in METHODS:
            before = os.getloadavg()[0]
            summary, rows = submit_run(CONNECTION, out_root / algorithm,
                                       {**base_run_config(args), "algorithm": algorithm,
                                        "inner_steps": args.inner_steps}, env, args.timeout)
            runs[algorithm] = (summary, measure(summary, rows, run_staleness(summary)),
                               [round(before, 2), round(os.getloadavg()[0], 2)])
    finally:
        subprocess.run([str(SCRIPT), "down"], cwd=ROOT, env=env, check=False)

    overhead = round_overhead(runs["diloco"][1])
    figures = {}
    for algorithm, (summary, measured, load) in runs.items():
        prediction = predict_run(algorithm, summary, measured, math.inf, 0.0, overhead)
        figures[algorithm] = {**compare(measured, prediction), "load_average": load}

    print(f"\nM={args.num_clients}, H={args.inner_steps}, {args.rounds} rounds, real SuperLink + "
          f"SuperNodes over loopback (no rate limit)")
    print(f"per-round deployment overhead O = {overhead:.2f} s (idle per worker-round of the diloco "
          f"run, steady rounds); planner: star, unlimited bandwidth, latency O/2 per hop, step "
          f"time measured in each run\n")
    print_table(figures)
    for algorithm, f in figures.items():
        print(f"{algorithm}: phase {f['phase_s']:.2f} s (step {f['step_time_s'] * 1000:.0f} ms), "
              f"final eval loss {f['final_eval_loss']:.4f}, 1-minute load average before/after "
              f"{f['load_average']} (2 shared cores)")
    print("diloco's prediction uses O from its own run (a check of the arithmetic); eager's is a "
          "prediction from that O")
    gain = overlap_gain(figures)
    print_overlap_gain(gain)
    print(json.dumps({"benchmark": "deployment_overlap", "link": "loopback, unshaped",
                      "num_clients": args.num_clients, "inner_steps": args.inner_steps,
                      "rounds": args.rounds, "round_overhead_s": overhead, "variants": figures, "overlap_gain": gain}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
