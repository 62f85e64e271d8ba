"""Where a real deployment's round goes: each `diloco` round's wall time, step by step.

Starts a local deployment (`scripts/local_deployment.sh up --insecure M`: one SuperLink, M
SuperNodes, separate processes over loopback), submits one short `diloco` run with `flwr run`
(tiny model, small H, eval every round), and stops exactly what it started. With
$FL_DILOCO_ROUND_EVENTS set (fl_diloco/round_events.py) the ServerApp, every ClientApp adapter
and every worker append a timestamped line per step to one file; the bench also stamps each
SuperNode log line as it appears (Flower's SuperNode is not ours to instrument: its steps are
the log lines "Receiving", "Received successfully", "Sending", "Sent successfully").

A `diloco` worker computes a phase, sends Δ(r−1), and waits until round r's message brings
the average back. For each node and round r the bench follows that one chain, from Δ(r−1)
ready to Δ(r) ready, through every process it crosses; consecutive timestamps make the
segments, so they add up exactly to the node's round wall time. Overhead = wall − the
worker's compute seconds (its inner steps). Segments marked "inferred" have no timestamp of
their own at one end: the SuperNode's steps are known to within the bench's 10 ms log polling,
and a ClientApp's process start is read from /proc (10 ms ticks).

`--poll default,0.5` runs the same bench once per SuperNode poll setting, side by side:
"default" is plain `flower-supernode` (3 s idle poll), a number S starts the SuperNodes as
`fl-diloco supernode --poll-interval S` through $FL_DILOCO_SUPERNODE_POLL, and is skipped
with a message where this checkout has no such launcher.

Usage:
    python bench/deployment_round_anatomy.py [--num-clients 2 --inner-steps 10 --rounds 8
                                              --poll default,0.5]

Prints the table (median and p90 per segment over the steady node-rounds, r ≥ 3) and, LAST,
one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployment_overlap import CONNECTION, ROOT, SCRIPT, deployment_env, submit_run  # noqa: E402

from fl_diloco.reporting import SUMMARY_NAME  # noqa: E402
from fl_diloco.round_events import EVENTS_ENV  # noqa: E402

POLL_ENV = "FL_DILOCO_SUPERNODE_POLL"  # read by scripts/local_deployment.sh (the short-poll launcher)
FIRST_STEADY_ROUND = 3  # round 2's chain starts in round 1, whose messages left before the server's start-up ended
LOG_POLL_S = 0.01
EVENTS_NAME = "round_events.jsonl"
SUPERNODE_EVENTS_NAME = "supernode_events.jsonl"  # the SuperNodes' log lines, as stamped

# The chain of one node's round r, in order: (segment, from event, to event, how it is known).
# Events: the processes' own (fl_diloco/round_events.py) and the SuperNode's log lines ("sn_*").
# `prev` marks an event of round r − 1 (the reply that closes it); "last_reply_pulled" is the
# last node's; "compute" is split off the worker's last segment with its compute seconds.
CHAIN = [
    ("worker → adapter: Δ(r−1) reply", ("prev", "delta_ready"), ("prev", "reply_received"), "measured"),
    ("adapter: Δ → Flower records", ("prev", "reply_received"), ("prev", "adapter_replied"), "measured"),
    ("ClientApp push + SuperNode reply poll (0.5 s by default)", ("prev", "adapter_replied"), ("prev", "sn_sending"),
     "inferred (log)"),
    ("ServerApp poll wait (up)", ("prev", "sn_sending"), ("prev", "pull_began"), "inferred (log)"),
    ("reply SuperNode → SuperLink → ServerApp (up)", ("prev", "pull_began"), ("prev", "reply_pulled"),
     "measured"),
    ("ServerApp waits for the other nodes", ("prev", "reply_pulled"), ("prev", "last_reply_pulled"), "measured"),
    ("aggregation (after the last reply)", ("prev", "last_reply_pulled"), ("prev", "round_closed"), "measured"),
    ("ServerApp: resync check", ("prev", "round_closed"), ("this", "round_opening"), "measured"),
    ("ServerApp: configure round r (our serialization)", ("this", "round_opening"), ("this", "round_configured"),
     "measured"),
    ("ServerApp → SuperLink push (down)", ("this", "round_configured"), ("this", "round_pushed"), "measured"),
    ("SuperNode idle poll (3 s by default) + pull", ("this", "round_pushed"), ("this", "sn_receiving"), "inferred (log)"),
    ("SuperExec task poll (1 s by default) + process spawn", ("this", "sn_receiving"), ("this", "clientapp_started"),
     "inferred (log, /proc)"),
    ("ClientApp start-up: Python, Flower's imports, message pull, FAB, the adapter's imports",
     ("this", "clientapp_started"), ("this", "adapter_called"), "inferred (/proc)"),
    ("adapter: records → request, worker check, connect", ("this", "adapter_called"),
     ("this", "adapter_connected"), "measured"),
    ("adapter → worker transfer (down)", ("this", "adapter_connected"), ("this", "worker_received"), "measured"),
    ("worker: decode average, wake the inner loop", ("this", "worker_received"), ("prev", "average_taken"),
     "measured"),
    ("worker: outer step, encode Δ(r)", ("prev", "average_taken"), ("this", "delta_ready"),
     "measured (minus compute)"),
]
COMPUTE = "compute (H inner steps)"
# Off the chain, overlapping it: the SuperLink hands the ServerApp a reply while the SuperNode
# still pushes its objects (the pull waits for them), the SuperNode pulls a message's objects
# while its SuperExec starts the ClientApp (which waits for them), and the ServerApp evaluates
# after pushing round r.
SN_PULL = "SuperNode pulls the message objects (overlaps the 2 segments after it)"
SN_PUSH = "SuperNode pushes the reply's objects (overlaps the 2 segments after it)"
EVALUATION = "evaluation (ServerApp; overlaps the segments after the push)"
TOTALS = {"wall": "**round wall**", "overhead": "**overhead = wall − compute**"}
SN_LINES = {"sn_receiving": re.compile(r"Receiving: \S+ message \(ID: (\w+)\)"),
            "sn_received": re.compile(r"Received successfully"),
            "sn_sending": re.compile(r"Sending: \S+ message \(ID: (\w+)\)"),
            "sn_sent": re.compile(r"Sent successfully")}


class LogStamper:
    """Follows log files from their current end; stamps each new line with the time it appeared."""

    def __init__(self, paths: list[Path]) -> None:
        self.lines: dict[Path, list[tuple[float, str]]] = {p: [] for p in paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> LogStamper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        files = {p: p.open("rb") for p in self.lines}
        for f in files.values():
            f.seek(0, os.SEEK_END)
        pending = {p: b"" for p in files}
        try:
            while not self._stop.is_set():
                for path, f in files.items():
                    chunk = f.read()
                    if not chunk:
                        continue
                    now = time.time()
                    *complete, pending[path] = (pending[path] + chunk).split(b"\n")
                    self.lines[path] += [(now, line.decode(errors="replace")) for line in complete]
                time.sleep(LOG_POLL_S)
        finally:
            for f in files.values():
                f.close()


def supernode_events(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """The SuperNode's steps as events keyed by message id (a 'Received'/'Sent' line belongs to
    the message of the 'Receiving'/'Sending' line before it: its loop handles one at a time)."""
    events, current = [], None
    for t, line in lines:
        for name, pattern in SN_LINES.items():
            if match := pattern.search(line):
                if match.groups():
                    current = match.group(1)
                events.append({"event": name, "message_id": current, "t": t})
    return events


def node_rounds(events: list[dict[str, Any]], sn_events: list[dict[str, Any]]) -> dict[tuple[int, int], dict]:
    """{(node, round): {event: t}} from every process's events and the SuperNodes' log lines;
    the server's events of a whole round (opening, closing, evaluation) go to each of its nodes."""
    by_key: dict[tuple[int, int], dict[str, float]] = {}
    whole_round: dict[int, dict[str, float]] = {}
    message_key: dict[str, tuple[int, int]] = {}
    partition_node = {e["partition"]: e["node"] for e in events if e["event"] == "adapter_called"}
    for e in events:
        r, node, name = e["round"], e["node"], e["event"]
        if r is None:
            continue
        if name == "round_pushed":
            for message_id, dst in e["messages"].items():
                message_key[message_id] = (dst, r)
                by_key.setdefault((dst, r), {})[name] = e["t"]
        elif name in ("round_opening", "round_configured", "round_closed"):
            whole_round.setdefault(r, {})[name] = e["t"]
        elif name == "evaluated":
            whole_round.setdefault(r, {})["eval_seconds"] = e["seconds"]
        else:
            if node is None:  # a worker's event: its node through its partition
                node = partition_node.get(e.get("partition"))
            times = by_key.setdefault((node, r), {})
            times[name] = e["t"]
            if name == "delta_ready":
                times["compute_seconds"] = e["compute_seconds"]
            if name == "reply_pulled":
                times["pull_began"] = e["pull_began"]
                message_key[e["message_id"]] = (node, r)
                last = whole_round.setdefault(r, {})
                last["last_reply_pulled"] = max(last.get("last_reply_pulled", 0.0), e["t"])
    for e in sn_events:
        if (key := message_key.get(e["message_id"])) is not None:
            by_key.setdefault(key, {}).setdefault(e["event"], e["t"])
    for (node, r), times in by_key.items():
        times.update(whole_round.get(r, {}))
    return by_key


def chains(by_key: dict[tuple[int, int], dict], first_round: int) -> list[dict[str, float]]:
    """Each steady node-round's segments (seconds), wall time, compute and overhead."""
    rows = []
    for (node, r), this in sorted(by_key.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        prev = by_key.get((node, r - 1))
        if node is None or r < first_round or prev is None:
            continue
        at = {"this": this, "prev": prev}
        try:
            row = {name: at[b_when][b] - at[a_when][a] for name, (a_when, a), (b_when, b), _ in CHAIN}
            row[SN_PUSH] = prev["sn_sent"] - prev["sn_sending"]
            row[SN_PULL] = this["sn_received"] - this["sn_receiving"]
        except KeyError as missing:
            print(f"node {node} round {r}: no {missing} event; left out", flush=True)
            continue
        compute = this["compute_seconds"]
        row["worker: outer step, encode Δ(r)"] -= compute
        row[COMPUTE] = compute
        row["wall"] = this["delta_ready"] - prev["delta_ready"]
        row["overhead"] = row["wall"] - compute
        row[EVALUATION] = prev.get("eval_seconds", 0.0)
        rows.append(row)
    return rows


def distribution(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def row_names() -> list[str]:
    return [name for name, *_ in CHAIN] + [COMPUTE, *TOTALS, SN_PUSH, SN_PULL, EVALUATION]


def summarize(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {key: distribution([row[key] for row in rows]) for key in row_names()}


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports (the SuperLink's, then one per
    SuperNode), so that the bench never meets another deployment on this machine."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, s in enumerate(sockets):
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1")


def short_poll_missing() -> str | None:
    """Why this checkout cannot start SuperNodes with a short poll, or None if it can."""
    if POLL_ENV not in SCRIPT.read_text():
        return f"{SCRIPT.relative_to(ROOT)} does not read ${POLL_ENV} (the short-poll launcher is not merged here)"
    if shutil.which("fl-diloco") is None or subprocess.run(
            ["fl-diloco", "supernode", "--help"], capture_output=True, check=False).returncode != 0:
        return "`fl-diloco supernode` is missing (the short-poll launcher is not merged here)"
    return None


def run_side(poll: str, args: argparse.Namespace, side_dir: Path) -> dict[str, Any]:
    """One deployment with SuperNode poll `poll`, one run; its anatomy (files in `side_dir`)."""
    side_dir.mkdir(parents=True, exist_ok=True)
    events_path = side_dir / EVENTS_NAME
    events_path.unlink(missing_ok=True)
    env = deployment_env("FL_DILOCO_DEPLOYMENT_DIR", side_dir / "deployment")
    # A Flower config and ports of its own: other deployments on this machine stay out of it.
    base = free_ports(1 + args.num_clients)
    env.update({EVENTS_ENV: str(events_path), "FLWR_HOME": str(side_dir / "flwr-home"),
                "FL_DILOCO_SUPERLINK_PORT": str(base), "FL_DILOCO_SUPERNODE_PORT": str(base + 1)})
    env.pop(POLL_ENV, None)
    if poll != "default":
        env[POLL_ENV] = poll
    subprocess.run([str(SCRIPT), "up", "--insecure", str(args.num_clients)], cwd=ROOT, env=env, check=True)
    logs = [side_dir / "deployment" / f"supernode-{i}.log" for i in range(args.num_clients)]
    load_before = os.getloadavg()[0]
    try:
        with LogStamper(logs) as stamper:
            summary, _ = submit_run(CONNECTION, side_dir / "run", {
                "algorithm": "diloco", "model": "tiny", "num_clients": args.num_clients,
                "inner_steps": args.inner_steps, "rounds": args.rounds, "eval_every": 1}, env, args.timeout)
    finally:
        subprocess.run([str(SCRIPT), "down"], cwd=ROOT, env=env, check=False)
    sn_events = [e for lines in stamper.lines.values() for e in supernode_events(lines)]
    (side_dir / SUPERNODE_EVENTS_NAME).write_text("".join(json.dumps(e) + "\n" for e in sn_events))
    return {**anatomy(side_dir), "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def anatomy(side_dir: Path) -> dict[str, Any]:
    """The anatomy of the run in `side_dir`, from its event files and summary.json."""
    events, sn_events = ([json.loads(line) for line in (side_dir / name).read_text().splitlines() if line]
                         for name in (EVENTS_NAME, SUPERNODE_EVENTS_NAME))
    rows = chains(node_rounds(events, sn_events), FIRST_STEADY_ROUND)
    if not rows:
        raise RuntimeError(f"no complete round chain in {side_dir}; see the deployment's logs")
    summary = json.loads((side_dir / "run" / SUMMARY_NAME).read_text())
    steps = summary["num_clients"] * summary["rounds"] * summary["inner_steps"]
    return {"components": summarize(rows), "node_rounds": len(rows),
            "step_time_s": summary["compute_seconds"] / steps, "wall_s": summary["wall_seconds"],
            "worker_setup_s": summary["worker_setup_seconds"]}


def import_seconds(repeats: int = 5) -> dict[str, float]:
    """What a ClientApp process imports, by `python -X importtime` in fresh processes (median):
    Flower's ClientApp runtime first, as `flwr-clientapp` does, then the adapter on top of it."""
    modules = {"flower": "flwr.supernode.cli.flwr_clientapp", "adapter": "fl_diloco.client_app"}
    samples: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", "; ".join(
            f"import {m}" for m in modules.values())], cwd=ROOT, capture_output=True, text=True, check=True)
        # "import time: <self us> | <cumulative us> | <module>"; each module appears once.
        cumulative = {fields[2].strip(): int(fields[1]) for line in result.stderr.splitlines()
                      if line.startswith("import time:") and (fields := line.split("|"))[1].strip().isdigit()}
        for name, module in modules.items():
            samples[name].append(cumulative[module] / 1e6)
    return {name: float(np.median(values)) for name, values in samples.items()}


def how(name: str) -> str:
    return next((h for n, _, _, h in CHAIN if n == name), "measured")


def print_table(sides: dict[str, dict[str, Any]]) -> None:
    measured = {poll: side for poll, side in sides.items() if "components" in side}
    header = " | ".join(f"poll {poll}: median | p90" for poll in measured)
    print(f"| segment (node's round r, from Δ(r−1) ready to Δ(r) ready) | how | {header} |")
    print("|---|---|" + "---|---|" * len(measured))
    for name in row_names():
        label = TOTALS.get(name, name)
        cells = " | ".join(f"{side['components'][name]['median']:.3f} | {side['components'][name]['p90']:.3f}"
                           for side in measured.values())
        print(f"| {label} | {how(name)} | {cells} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=10, help="H (small: the overhead is the subject)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--poll", default="default",
                        help="comma-separated SuperNode poll settings: 'default' (flower-supernode) "
                             "and/or seconds for `fl-diloco supernode --poll-interval`, e.g. default,0.2")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "deployment-round-anatomy")
    parser.add_argument("--reanalyze", action="store_true",
                        help="run nothing: rebuild the table from the files an earlier bench left in --out-dir")
    args = parser.parse_args(argv)
    if args.rounds <= FIRST_STEADY_ROUND:
        parser.error(f"--rounds must be > {FIRST_STEADY_ROUND}: the chains of rounds < {FIRST_STEADY_ROUND} "
                     f"include the start-up")
    polls = [p.strip() for p in args.poll.split(",") if p.strip()]
    for poll in polls:
        if poll != "default":
            try:
                float(poll)
            except ValueError:
                parser.error(f"--poll: '{poll}' is neither 'default' nor a number of seconds")

    sides: dict[str, dict[str, Any]] = {}
    for poll in polls:
        side_dir = args.out_dir.resolve() / f"poll-{poll}"
        missing = short_poll_missing() if poll != "default" and not args.reanalyze else None
        if missing:
            print(f"\n== poll {poll}: skipped: {missing}", flush=True)
            sides[poll] = {"skipped": missing}
        elif args.reanalyze:
            sides[poll] = anatomy(side_dir) if (side_dir / EVENTS_NAME).exists() else {"skipped": "not run"}
        else:
            sides[poll] = run_side(poll, args, side_dir)

    print(f"\nM={args.num_clients}, H={args.inner_steps}, {args.rounds} rounds (steady: r ≥ "
          f"{FIRST_STEADY_ROUND}), diloco, tiny model, real SuperLink + SuperNodes over loopback; "
          f"seconds per node-round\n")
    print_table(sides)
    for poll, side in sides.items():
        if "components" in side:
            load = (f", 1-minute load average before/after {side['load_average']} ({os.cpu_count()} cores)"
                    if "load_average" in side else "")
            print(f"poll {poll}: {side['node_rounds']} node-rounds, step {side['step_time_s'] * 1000:.0f} ms, "
                  f"workers' start-up {side['worker_setup_s']:.1f} s, run wall {side['wall_s']:.1f} s{load}")
    imports = None if args.reanalyze else import_seconds()
    if imports:
        print(f"a ClientApp process's imports (python -X importtime, median of 5): Flower's ClientApp "
              f"runtime {imports['flower'] * 1000:.0f} ms, then the adapter {imports['adapter'] * 1000:.1f} ms")
    print(json.dumps({"benchmark": "deployment_round_anatomy", "link": "loopback, unshaped",
                      "clientapp_import_s": imports,
                      "algorithm": "diloco", "num_clients": args.num_clients, "inner_steps": args.inner_steps,
                      "rounds": args.rounds, "first_steady_round": FIRST_STEADY_ROUND, "sides": sides}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
