"""Is the overlap real in deployment? `diloco` against `eager`, plain or streaming, on a real
SuperLink + SuperNodes, measured, and predicted by the planner from the measured per-round
overhead.

Starts a local deployment (`scripts/local_deployment.sh up --insecure M`: one SuperLink, M
SuperNodes, separate processes over loopback), submits the same run once per variant with
`flwr run` (by default `diloco` and `eager`, d = 1; `--methods` adds streaming ones, e.g.
`diloco-p2,eager-p4` for P = 2 and 4 fragments), H chosen for a phase of about 10 s, and
stops exactly what it started at the end.

Loopback moves the payload in milliseconds, so a `diloco` worker's idle seconds per round are
the deployment's own overhead per round O: the SuperNode polls the SuperLink every 3 s, its
SuperExec polls for work every 1 s, every message starts a fresh ClientApp process (importing
Flower alone costs ~2.5 s of CPU), the ServerApp polls for replies
(docs/algorithms.md#flower-constraints). For each run it prints each worker's compute and
idle seconds and compute utilization (CU = compute / (compute + idle)) from summary.json and
metrics.jsonl, next to the planner's prediction
(fl_diloco.planner.predict: Flower's star, unlimited bandwidth, the step time measured in
that run's steady rounds, and O as latency, i.e. O / sync_hops = O / 2 per hop). O comes from
the `diloco` run itself (or `--overhead-from`), so for `diloco` the prediction only checks the
planner's arithmetic (CU = H·T / (H·T + O)); for the others it is a prediction: streaming `diloco`
waits O once per fragment (CU = H·T / (H·T + P·O)), and `eager` hides O completely while O is
shorter than a phase.

Two CUs are shown. "run" is summary.json's, over every round. "steady" leaves out the first
2 + d·P Flower rounds (fl_diloco.planner.startup_rounds: d = 0 for diloco, 1 for eager):
round 1 never waits, the next 1 + d·P wait for averages whose requests went out only after
the ServerApp's start-up. Every remaining round is H/P steps plus one wait, the steady state
the planner models. The relative error is measured / predicted - 1 on the steady CU.

The planner assumes a node takes every round the server keeps in flight (d·P of them) as
soon as it is sent. Flower 1.41's SuperNode serves one message at a time: it pulls the next
only once it has pushed the reply to the last one (`_push_messages` in
flwr/supernode/start_client_internal.py). The bench measures that from the SuperNodes' logs
(timestamps: the deployment runs with FLWR_LOG_LEVEL=DEBUG): per node, how many train rounds
it held at once, and its cycle S per round, from taking the worker's reply to round r − 1 to
starting the ClientApp that brings round r (push, pull, start-up; the ClientApp's own imports
come on top). A worker needs round r's message (it carries the average it applies) at its
round-r sync, H/P steps after round r − 1's: with one message at a time, `eager` waits
S − W per round when the node's cycle S exceeds W = H/P·T, the compute of one round, so its
CU is at most W / max(W, S) ("serial bound" in the table). Fewer, larger rounds (larger H/P)
hide the node's cycle again.

Usage:
    python bench/deployment_overlap.py [--num-clients 2 --inner-steps 65 --rounds 6]
    python bench/deployment_overlap.py --model tiny-10m --inner-steps 8 --rounds 4 \
        --methods diloco,diloco-p2,eager-p2,diloco-p4,eager-p4
    python bench/deployment_overlap.py --supernode-poll 0.1   # fl-diloco supernode's short poll

(`tiny` has 2 transformer blocks, so P <= 2; `tiny-10m` has 6.) The LAST line of stdout is
one JSON object with the figures; `fl-diloco plan --overhead-from FILE` reads O from it. The
helpers here are shared with bench/rate_limited_links.py (the same runs behind rate-limited
links).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fl_diloco.planner import (  # noqa: E402
    Prediction,
    Workload,
    idle_per_worker_round,
    overhead_from_file,
    predict,
    startup_rounds,
    steady_rows,
    sync_hops,
)
from fl_diloco.reporting import METRICS_NAME, SUMMARY_NAME, compute_utilization  # noqa: E402
from strategies.fragments import rounds_in_flight  # noqa: E402

SCRIPT = ROOT / "scripts" / "local_deployment.sh"
CONNECTION = "fl-diloco-local-insecure"  # what `local_deployment.sh up --insecure` adds
METHODS = ("diloco", "eager")  # the default variants; rate_limited_links.py runs these
# How local_deployment.sh is told to start `fl-diloco supernode --poll-interval S` instead of
# Flower's own SuperNode; a tree without that launcher has no mention of it.
POLL_VARIABLE = "FL_DILOCO_SUPERNODE_POLL"
STEADY_ROUNDS = 2  # Flower rounds each run keeps after its start-up rounds
LOAD_NAME = "load_average.json"  # beside each run's summary: 1-minute load before and after it


class Variant(NamedTuple):
    """One row: `diloco` or `eager` (d = 1), streaming with P fragments when P > 1."""

    algorithm: str
    fragments: int = 1

    @property
    def name(self) -> str:
        return self.algorithm if self.fragments == 1 else f"{self.algorithm}-p{self.fragments}"

    @property
    def staleness(self) -> int:
        return 1 if self.algorithm == "eager" else 0

    def run_config(self) -> dict[str, Any]:
        streaming = {"streaming": True, "fragments": self.fragments} if self.fragments > 1 else {}
        return {"algorithm": self.algorithm, **streaming}

    def min_rounds(self) -> int:
        """Outer steps for STEADY_ROUNDS Flower rounds after the start-up ones."""
        return math.ceil((startup_rounds(self.staleness, self.fragments) + STEADY_ROUNDS) / self.fragments)


def parse_variants(text: str) -> list[Variant]:
    """'diloco,eager-p4' -> the variants; -p<P> makes one streaming with P fragments."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(diloco|eager)(?:-p([1-9][0-9]*))?", item)
        if match is None:
            raise argparse.ArgumentTypeError(f"each method must be diloco or eager, optionally with "
                                             f"-p<P> for streaming with P fragments, got {item!r}")
        variants.append(Variant(match[1], int(match[2] or 1)))
    if len({v.name for v in variants}) != len(variants) or not variants:
        raise argparse.ArgumentTypeError(f"--methods must name each variant once, got {text!r}")
    return variants


def submit_run(connection: str, out_dir: Path, run_config: dict[str, Any], env: dict[str, str],
               timeout: float) -> tuple[dict, list[dict]]:
    """`flwr run` one run on a running deployment; returns (summary.json, metrics.jsonl rows)."""
    summary_path = out_dir / SUMMARY_NAME
    summary_path.unlink(missing_ok=True)
    # overwrite: a rerun of the bench replaces its own earlier run in out_dir.
    text = " ".join(f"{k}={_toml(v)}" for k, v in {**run_config, "out_dir": str(out_dir)}.items()) \
        + " overwrite=true"
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


def _toml(value: Any) -> str:
    """A --run-config value as Flower parses it (TOML)."""
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_run(out_dir: Path) -> tuple[dict, list[dict], list[float] | None]:
    """A finished run of this bench: summary.json, metrics.jsonl rows, the load average around it."""
    if not (out_dir / SUMMARY_NAME).is_file():
        raise SystemExit(f"{out_dir / SUMMARY_NAME} does not exist: no finished run of that variant there")
    rows = [json.loads(line) for line in (out_dir / METRICS_NAME).read_text().splitlines() if line]
    load = out_dir / LOAD_NAME
    return (json.loads((out_dir / SUMMARY_NAME).read_text()), rows,
            json.loads(load.read_text()) if load.is_file() else None)


def fragments_of(summary: dict) -> int:
    """P of the run: 1 unless streaming."""
    return summary["config"]["fragments"] if summary["config"]["streaming"] else 1


def measure(summary: dict, rows: list[dict]) -> dict[str, Any]:
    """What a run measured: step time, per-round compute/idle, CU over the run and steady."""
    m, h, rounds = summary["num_clients"], summary["inner_steps"], summary["rounds"]
    fragments, d = fragments_of(summary), run_staleness(summary)
    steady = steady_rows(summary, rows)
    per_worker: dict[int, list[float]] = {}
    for row in steady:
        for client in row["clients"]:
            acc = per_worker.setdefault(int(client["partition_id"]), [0.0, 0.0])
            acc[0] += client["compute_seconds"]
            acc[1] += client["idle_seconds"]
    compute = sum(c for c, _ in per_worker.values())
    idle = sum(i for _, i in per_worker.values())
    worker_rounds = max(1, sum(len(r["clients"]) for r in steady))
    steps_per_round = h // fragments
    return {
        "fragments": fragments,
        "flower_rounds": rounds * fragments,
        "rounds_in_flight": rounds_in_flight(d, fragments),  # the server keeps open at once
        "step_time_s": summary["compute_seconds"] / (m * rounds * h),
        # what the planner is given: T over the same rounds as the steady CU it predicts
        "steady_step_time_s": compute / worker_rounds / steps_per_round,
        "phase_s": summary["compute_seconds"] / (m * rounds),
        "compute_s_per_worker_round": compute / worker_rounds,
        "idle_s_per_worker_round": idle_per_worker_round(steady),
        "cu_run": summary["compute_utilization"],
        "cu_run_per_worker": [w["compute_utilization"] for w in summary["workers"]],
        "cu_steady": compute_utilization(compute, idle),
        "cu_steady_per_worker": [compute_utilization(c, i) for _, (c, i) in sorted(per_worker.items())],
        "steady_rounds": len(steady),
        "wall_s": summary["wall_seconds"],
        # from the ServerApp's log start to the close of the last round (no final checkpoint/plot)
        "train_wall_s": rows[-1]["wall_seconds"],
        "wire_bytes_up_per_sync": summary["bytes_up"] / (m * rounds * fragments),
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
    """The run as the planner sees it: its model, M, H, P and wire, Flower's star topology.

    Each SuperNode has its own link; the SuperLink's is not limited (server bandwidth inf).
    """
    from fl_diloco.planner import workload_from_preset

    cfg = summary["config"]
    streaming = {"fragments": cfg["fragments"], "fragment_pattern": cfg["fragment_pattern"]} \
        if cfg["streaming"] else {}
    workload = workload_from_preset(_preset(cfg["model"]), step_time, vocab_size=cfg["vocab_size"],
                                    seq_len=cfg["seq_len"], workers=summary["num_clients"],
                                    inner_steps=summary["inner_steps"], precision=cfg["wire_precision"],
                                    topology="star", server_bandwidth_gbps=math.inf, **streaming)
    if workload.params != summary["num_parameters"]:
        raise RuntimeError(f"planner counts {workload.params:.0f} parameters for {cfg['model']}, the run "
                           f"{summary['num_parameters']}: the preset and the run disagree")
    return workload


def _preset(model: str) -> str:
    from fl_diloco.config import MODEL_ALIASES

    return MODEL_ALIASES.get(model, model)


def planner_method(summary: dict) -> str:
    """The run's method in fl_diloco.planner's names: diloco, streaming, ...-eager<d>."""
    family = "streaming" if summary["config"]["streaming"] else "diloco"
    d = run_staleness(summary)
    return f"{family}-eager{d}" if d else family


def predict_run(summary: dict, measured: dict, bandwidth_gbps: float, delay_s: float,
                overhead_s: float) -> Prediction:
    """The planner's CU and wall time for this run: T of its steady rounds, configured link,
    measured O."""
    workload = flower_workload(summary, measured["steady_step_time_s"])
    latency = delay_s + overhead_s / sync_hops(workload)
    return predict(workload, planner_method(summary), bandwidth_gbps, latency,
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


# --------------------------------------------------------------------------------------
# What each SuperNode did, from its log (Flower's DEBUG lines carry timestamps)
# --------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LINE = re.compile(r"^[A-Z]+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s*(.*)$")
_RUN = re.compile(r"^\[RUN (\d+)(?:, ROUND (\d+))?\]$")  # before each Receiving/Sending line
# The node's lines, in the order one train round produces them (Flower 1.41's
# start_client_internal.py, and its SuperExec's and ClientApp's, which share its log).
_EVENTS = {"Receiving: ": "received_from", "Received successfully": "received",
           "Loading ClientApp": "clientapp_loading", "Sending: ": "sending",
           "Sent successfully": "sent"}
_INCOMING = ("received_from", "received", "clientapp_loading")  # of the message being received


def node_rounds(log_text: str) -> dict[str, dict[int, dict[str, float]]]:
    """Flower run id -> round -> {event: unix time}: the train rounds in a SuperNode's log, the
    runs in the order they came."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    current = None  # (run, round) of the last "[RUN .., ROUND r]" line; None for a query
    receiving = None  # (run, round) being received, which the next ClientApp serves
    for raw in log_text.splitlines():
        match = _LINE.match(_ANSI.sub("", raw).strip())
        if match is None:
            continue
        message = match[2].strip()
        if named := _RUN.match(message):
            current = (named[1], int(named[2])) if named[2] else None
            continue
        event = next((e for prefix, e in _EVENTS.items() if message.startswith(prefix)), None)
        if event == "received_from":
            receiving = current
        round_of = receiving if event in _INCOMING else current
        if event and round_of is not None:
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            runs.setdefault(round_of[0], {}).setdefault(round_of[1], {}).setdefault(event, stamp)
    return runs


def node_service(rounds: dict[int, dict[str, float]], first_steady: int) -> dict[str, Any]:
    """One node's concurrency and per-round cycle, from `node_rounds`.

    held_at_once: the most train rounds the node held at the same time (received, not yet
    sent). cycle_s: from the node taking the worker's reply to round r - 1 ("Sending") to the
    ClientApp that brings round r loading the app; the worker cannot have round r's message
    sooner. queued: rounds whose message the node pulled within 0.5 s of sending the last
    reply, i.e. it was waiting at the SuperLink while the node was busy.
    """
    spans = sorted((t["received_from"], t["sent"]) for t in rounds.values()
                   if {"received_from", "sent"} <= t.keys())
    held = max((sum(1 for s, e in spans if s <= start < e) for start, _ in spans), default=0)
    cycles, queued, steady = [], 0, 0
    for r, t in sorted(rounds.items()):
        last = rounds.get(r - 1, {})
        if r < first_steady or not {"sending", "sent"} <= last.keys() or "received_from" not in t:
            continue
        steady += 1
        queued += t["received_from"] - last["sent"] < 0.5
        if "clientapp_loading" in t:
            cycles.append(t["clientapp_loading"] - last["sending"])
    return {"held_at_once": held, "cycle_s": statistics.median(cycles) if cycles else None,
            "queued_share": queued / steady if steady else None}


def node_runs(state_dir: Path, count: int) -> list[list[dict[int, dict[str, float]]]]:
    """Each run's train rounds on each of the deployment's `count` SuperNodes (`node_rounds`
    of supernode-<i>.log), the runs in the order they came."""
    per_node = [node_rounds(path.read_text(errors="replace")) if path.exists() else {}
                for path in (state_dir / f"supernode-{i}.log" for i in range(count))]
    run_ids = dict.fromkeys(run for node in per_node for run in node)
    return [[node.get(run, {}) for node in per_node] for run in run_ids]


def serial_bound(measured: dict, services: list[dict]) -> dict[str, Any]:
    """The nodes' cycle S against W, one round's compute: CU <= W / max(W, S) when a node
    serves one message at a time and a round's message is needed one round after the last."""
    cycles = [s["cycle_s"] for s in services if s["cycle_s"] is not None]
    cycle = statistics.median(cycles) if cycles else None
    work = measured["compute_s_per_worker_round"]
    pipelined = cycle is not None and measured["rounds_in_flight"] > 1
    return {"nodes": services, "node_held_at_once": max((s["held_at_once"] for s in services), default=0),
            "node_cycle_s": cycle, "serial_bound_cu": work / max(work, cycle) if pipelined else None}


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


def print_node_table(figures: dict[str, dict]) -> None:
    print("| variant | P | rounds in flight (server) | held at once (node, max) | request queued at "
          "the SuperLink | node cycle S (s) | W = compute per round (s) | serial bound W/max(W,S) | "
          "CU steady |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        queued = [s["queued_share"] for s in f["nodes"] if s["queued_share"] is not None]
        print(f"| {name} | {f['fragments']} | {f['rounds_in_flight']} | {f['node_held_at_once']} | "
              f"{_shown(statistics.mean(queued) if queued else None, '.0%')} | "
              f"{_shown(f['node_cycle_s'], '.1f')} | {f['compute_s_per_worker_round']:.1f} | "
              f"{_shown(f['serial_bound_cu'], '.3f')} | {f['cu_steady']:.3f} |")


def _shown(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def check_rounds(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 variants: list[Variant] | None = None) -> None:
    variants = variants or [Variant(m) for m in METHODS]
    needed = max(v.min_rounds() for v in variants)
    if args.rounds < needed:
        parser.error(f"--rounds must be >= {needed}: each run's first 2 + d·P Flower rounds are "
                     f"start-up, and the steady state needs {STEADY_ROUNDS} more")


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
                        help="H; pick it for a phase of ~10 s (65 at ~150 ms per step on tiny)")
    parser.add_argument("--rounds", type=int, default=6, help="outer steps per run")
    parser.add_argument("--model", default="tiny", help="model preset (tiny has 2 blocks: P <= 2)")
    parser.add_argument("--methods", type=parse_variants, default=parse_variants(",".join(METHODS)),
                        help="comma-separated variants: diloco, eager, and streaming ones as "
                             "diloco-p<P>, eager-p<P> (default diloco,eager)")
    parser.add_argument("--overhead-from", metavar="FILE",
                        help="O from an earlier measurement (a deployment bench's output or a "
                             "diloco run's summary.json) instead of this run's diloco")
    parser.add_argument("--supernode-poll", type=float, metavar="S",
                        help="start the SuperNodes as `fl-diloco supernode --poll-interval S` "
                             "(default: Flower's flower-supernode)")
    parser.add_argument("--analyse-only", action="store_true",
                        help="start nothing: read the runs an earlier bench left in --out-dir "
                             "(e.g. with another --overhead-from)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "deployment-overlap")
    args = parser.parse_args(argv)
    variants = args.methods
    check_rounds(parser, args, variants)
    if args.overhead_from is None and Variant("diloco") not in variants:
        parser.error("--methods must include diloco, whose idle time is the overhead O, "
                     "or give --overhead-from")
    if args.overhead_from is not None:  # read before anything runs, so a bad file costs nothing
        try:
            overhead, source = overhead_from_file(args.overhead_from)
        except ValueError as err:
            parser.error(str(err))
    out_root = args.out_dir.resolve()
    state_dir = out_root / "deployment"
    env = deployment_env("FL_DILOCO_DEPLOYMENT_DIR", state_dir)
    env["FLWR_LOG_LEVEL"] = "DEBUG"  # timestamps on the SuperNodes' lines (node_rounds)
    if args.supernode_poll is not None and not args.analyse_only:
        if POLL_VARIABLE not in SCRIPT.read_text():
            reason = (f"--supernode-poll needs the short-poll SuperNode launcher (fl-diloco supernode, "
                      f"{POLL_VARIABLE} in {SCRIPT.relative_to(ROOT)}), which this tree does not have")
            print(f"SKIPPED: {reason}")
            print(json.dumps({"benchmark": "deployment_overlap", "skipped": reason}))
            return 0
        env[POLL_VARIABLE] = f"{args.supernode_poll:g}"

    if not args.analyse_only:
        subprocess.run([str(SCRIPT), "up", "--insecure", str(args.num_clients)], cwd=ROOT, env=env, check=True)
        try:
            for variant in variants:
                before = os.getloadavg()[0]
                submit_run(CONNECTION, out_root / variant.name,
                           {**base_run_config(args), "model": args.model, "inner_steps": args.inner_steps,
                            **variant.run_config()}, env, args.timeout)
                (out_root / variant.name / LOAD_NAME).write_text(
                    json.dumps([round(before, 2), round(os.getloadavg()[0], 2)]))
        finally:
            subprocess.run([str(SCRIPT), "down"], cwd=ROOT, env=env, check=False)

    node_logs = node_runs(state_dir, args.num_clients)  # `up` started the logs afresh
    if len(node_logs) != len(variants):
        raise SystemExit(f"{state_dir} has SuperNode logs of {len(node_logs)} runs, not of the "
                         f"{len(variants)} --methods names, in that order")
    runs = {}
    for variant, nodes in zip(variants, node_logs):
        summary, rows, load = read_run(out_root / variant.name)
        measured = measure(summary, rows)
        first_steady = startup_rounds(variant.staleness, variant.fragments) + 1
        services = [node_service(rounds, first_steady) for rounds in nodes]
        runs[variant.name] = (summary, {**measured, **serial_bound(measured, services)}, load)

    if args.overhead_from is None:
        overhead = round_overhead(runs["diloco"][1])
        source = "idle per worker-round of the diloco run, steady rounds"
    figures = {}
    for name, (summary, measured, load) in runs.items():
        prediction = predict_run(summary, measured, math.inf, 0.0, overhead)
        figures[name] = {**compare(measured, prediction), "load_average": load}

    poll = f"fl-diloco supernode --poll-interval {args.supernode_poll:g}" \
        if args.supernode_poll is not None else "flower-supernode (3 s idle poll)"
    print(f"\nM={args.num_clients}, model {args.model}, H={args.inner_steps}, {args.rounds} outer "
          f"steps, real SuperLink + SuperNodes ({poll}) over loopback (no rate limit)")
    print(f"per-round deployment overhead O = {overhead:.2f} s ({source}); planner: star, "
          f"unlimited bandwidth, latency O/2 per hop, step time of each run's steady rounds\n")
    print_table(figures)
    print()
    print_node_table(figures)
    for name, f in figures.items():
        print(f"{name}: phase {f['phase_s']:.2f} s (step {f['step_time_s'] * 1000:.0f} ms), "
              f"{f['steady_rounds']} steady of {f['flower_rounds']} Flower rounds, final eval loss "
              f"{f['final_eval_loss']:.4f}, 1-minute load average before/after {f['load_average']} "
              f"(2 shared cores)")
        if f["serial_bound_cu"] is not None and f["serial_bound_cu"] < 1:
            steps = math.ceil(f["node_cycle_s"] / f["steady_step_time_s"])
            print(f"  {name}: a node's cycle S = {f['node_cycle_s']:.1f} s is longer than a round's "
                  f"compute; fewer, larger rounds hide it: H/P >= {steps} steps, i.e. H >= "
                  f"{steps * f['fragments']} at P = {f['fragments']}")
    if args.overhead_from is None:
        print("diloco's prediction uses O from its own run (a check of the arithmetic); the others' "
              "are predictions from that O")
    gain = overlap_gain(figures) if {"diloco", "eager"} <= figures.keys() else None
    if gain:
        print_overlap_gain(gain)
    print(json.dumps({"benchmark": "deployment_overlap", "link": "loopback, unshaped",
                      "supernode": poll, "model": args.model,
                      "num_clients": args.num_clients, "inner_steps": args.inner_steps,
                      "rounds": args.rounds, "round_overhead_s": overhead,
                      "round_overhead_source": source, "variants": figures,
                      "overlap_gain": gain}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
