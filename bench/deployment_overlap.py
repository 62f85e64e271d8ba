"""Is the overlap real in deployment? `diloco` against `eager` on a real SuperLink + SuperNodes.

Starts a local deployment (scripts/local_deployment.sh: one SuperLink, M SuperNodes, separate
processes over loopback), submits the same run twice with `flwr run`, once as `diloco` and
once as `eager` (d = 1), and reports each worker's compute and idle seconds and compute
utilization from the runs' summary.json. Deployment adds a few seconds per round of polling
and process start-up (SPEC §5): `diloco` workers sit idle through it, `eager` workers keep
computing, as long as it is shorter than a phase. Stops exactly what it started at the end.

Usage:
    python bench/deployment_overlap.py [--num-clients 2 --inner-steps 60 --rounds 6]

The LAST line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local_deployment.sh"


def run_variant(algorithm: str, args: argparse.Namespace, out_root: Path, env: dict) -> dict:
    out_dir = out_root / algorithm
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    run_config = (f'algorithm="{algorithm}" num_clients={args.num_clients} inner_steps={args.inner_steps} '
                  f'rounds={args.rounds} eval_every={args.rounds} out_dir="{out_dir}"')
    print(f"\n== {algorithm}: flwr run . fl-diloco-local --run-config '{run_config}'", flush=True)
    began = time.monotonic()
    subprocess.run(["flwr", "run", ".", "fl-diloco-local", "--run-config", run_config, "--stream"],
                   cwd=ROOT, env=env, check=True, timeout=args.timeout)
    while not summary_path.exists():  # --stream may return before the ServerApp's last write
        if time.monotonic() - began > args.timeout:
            raise TimeoutError(f"{algorithm}: no {summary_path} after {args.timeout}s; see the logs in "
                               f"{env['FL_DILOCO_DEPLOYMENT_DIR']}")
        time.sleep(1)
    return json.loads(summary_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=60, help="H; pick it for a phase of ~10 s")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "deployment-overlap")
    args = parser.parse_args(argv)
    out_root = args.out_dir.resolve()
    env = {**os.environ, "FL_DILOCO_DEPLOYMENT_DIR": str(out_root / "deployment")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    subprocess.run([str(SCRIPT), "up", str(args.num_clients)], cwd=ROOT, env=env, check=True)
    try:
        summaries = {a: run_variant(a, args, out_root, env) for a in ("diloco", "eager")}
    finally:
        subprocess.run([str(SCRIPT), "down"], cwd=ROOT, env=env, check=False)

    print(f"\nM={args.num_clients}, H={args.inner_steps}, {args.rounds} rounds, real SuperLink + SuperNodes\n")
    print("| algorithm | compute s per worker-round | idle s per worker-round | compute utilization | final eval loss |")
    print("|---|---|---|---|---|")
    figures = {}
    for algorithm, s in summaries.items():
        worker_rounds = args.num_clients * args.rounds
        figures[algorithm] = {
            "compute_seconds_per_round": s["compute_seconds"] / worker_rounds,
            "idle_seconds_per_round": s["idle_seconds"] / worker_rounds,
            "compute_utilization": s["compute_utilization"],
            "per_worker_compute_utilization": [w["compute_utilization"] for w in s["workers"]],
            "final_eval_loss": s["final_eval_loss"], "wall_seconds": s["wall_seconds"],
        }
        f = figures[algorithm]
        print(f"| {algorithm} | {f['compute_seconds_per_round']:.2f} | {f['idle_seconds_per_round']:.2f} | "
              f"{f['compute_utilization']:.3f} | {f['final_eval_loss']:.4f} |")
    print(json.dumps({"benchmark": "deployment_overlap", "num_clients": args.num_clients,
                      "inner_steps": args.inner_steps, "rounds": args.rounds, "variants": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
