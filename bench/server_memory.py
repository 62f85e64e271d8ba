"""How much memory does the server need to aggregate a round of M clients? (CPU benchmark)

The strategy folds each reply into a running sum as soon as it is validated
(`strategies.outer_optimizer.WeightedAverage`), and the ServerApp hands it the replies one
at a time, so aggregating should cost O(model size) memory, not M copies of an outer
gradient. For each M (default 4 and 16) two measurements run, each in a fresh subprocess so
that one run's peak cannot hide in another's baseline:

(a) **simulation**: `fl_diloco.simulation.simulate`, a real Flower simulation of M clients.
    The process measured is the one that runs the ServerApp (`run_server`). In a simulation
    that process also hosts Flower's simulation runtime: the in-memory LinkState, which
    keeps every reply from the moment its ClientApp returns until the server pulls it, and
    the Ray driver, which maps Ray's shared-memory object store to pass messages to and from
    the ClientApps. The M ClientApps (Ray actors) and M worker processes are other processes
    and are not counted.
      baseline  RSS when the strategy builds round 1's messages: the corpus is loaded, every
                worker holds θ(0), the round-0 evaluation is done.
      peak      the highest RSS from then until the last round is aggregated: receiving the
                replies, aggregating them, building and sending the next round's messages.
                Evaluation runs only after the last round (eval_every > rounds).
(b) **strategy**: `strategies.diloco.DiLoCo` alone, no Flower transport. M synthetic fp32
    replies go through one `aggregate_train(1, replies)`, where `replies` is a generator
    that builds each reply only when the strategy asks for the next one.
      baseline  RSS once the strategy (θ, outer momentum) and round 1's requests exist.
      peak      the highest RSS during `aggregate_train`.

Figures, all in MB of RSS and in model copies (fp32 bytes of the parameters):
  total     peak − baseline of the whole RSS, from the kernel's exact high-water mark
            (VmHWM, reset at the baseline through /proc/self/clear_refs).
  private   the same for RssAnon alone, the process's own heap (Python objects, numpy and
            torch buffers), sampled every 5 ms. The rest of the total is mostly shared
            memory the process maps (RssShmem: Ray's object store, in a simulation).
  queued    (simulation) the most replies Flower's LinkState still held, not yet pulled,
            at the moment the strategy took a reply.

How to read it: the strategy's growth should be the same handful of copies for every M (the
running sum, the final average with its wire encoding and decoded copy, the reply being
read, and the first replies, which the outlier check holds until a median exists). If it grew
by about one copy per client, something would be holding the replies. The simulation adds
what the transport keeps: when M replies arrive at once, Flower's LinkState holds them until
the server pulls them, so the simulation's first round can grow by about a copy per client
even though the strategy holds one at a time (`queued` shows it). Memory that Python, torch
and Ray free is not always given back to the OS at once, so later rounds' peaks sit above
what is live.

Measured with /proc/self, so Linux only. Many clients on few cores are slow to start (every
ClientApp and worker process imports torch), and each simulated client holds the model
several times over: M = 16 with the default model took about 15 GB of RAM in all.

Usage:
    python bench/server_memory.py [--clients 4 16 --model small --rounds 3 --inner-steps 2
                                   --skip-simulation --skip-strategy --work-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# Runnable as `python bench/server_memory.py` from a checkout: put the repo root first.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flwr.app import Message  # noqa: E402

from fl_diloco.client_app import train_reply_content  # noqa: E402
from fl_diloco.config import RunConfig  # noqa: E402
from fl_diloco.model import Transformer, model_config  # noqa: E402

MB = 1e6
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


# --------------------------------------------------------------------------- measuring RSS
def memory_status() -> dict[str, float]:
    """This process's RSS now (total, private, shared memory) and its high-water mark, in MB."""
    fields = {"VmRSS": "rss", "RssAnon": "private", "RssShmem": "shared", "VmHWM": "hwm"}
    values = {}
    for line in STATUS.read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in fields:
            values[fields[key]] = int(line.split()[1]) * 1e3 / MB  # reported in kB
    return values


def reset_peak_rss() -> None:
    # Writing 5 resets the kernel's RSS high-water mark to the current RSS (Linux >= 4.0).
    CLEAR_REFS.write_text("5")


def check_platform() -> None:
    try:
        reset_peak_rss()
        missing = {"rss", "private", "shared", "hwm"} - set(memory_status())
    except OSError as err:
        raise SystemExit(f"this benchmark reads memory from /proc/self (Linux only): {err}") from None
    if missing:
        raise SystemExit(f"{STATUS} lacks {sorted(missing)}; this benchmark needs Linux >= 4.5")


class PeakMemory:
    """Peaks of this process's memory over consecutive windows (see the module docstring).

    `start()` takes the baseline; each `lap()` returns the peaks since the previous lap (or
    the start) and opens the next window.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._peak_private = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline: dict[str, float] = {}

    def start(self) -> None:
        gc.collect()
        self.baseline = memory_status()
        self._peak_private = self.baseline["private"]
        reset_peak_rss()
        self._thread.start()

    def lap(self) -> dict[str, float]:
        with self._lock:
            now = memory_status()
            peaks = {"peak_mb": now["hwm"], "peak_private_mb": max(self._peak_private, now["private"])}
            reset_peak_rss()
            self._peak_private = now["private"]
        return peaks

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            private = memory_status()["private"]
            with self._lock:
                self._peak_private = max(self._peak_private, private)


def growth(baseline: Mapping[str, float], peaks: Mapping[str, float], copy_mb: float) -> dict[str, float]:
    total = peaks["peak_mb"] - baseline["rss"]
    private = peaks["peak_private_mb"] - baseline["private"]
    return {"baseline_mb": round(baseline["rss"], 1), "peak_mb": round(peaks["peak_mb"], 1),
            "growth_mb": round(total, 1), "growth_model_copies": round(total / copy_mb, 2),
            "private_growth_mb": round(private, 1),
            "private_growth_model_copies": round(private / copy_mb, 2)}


def model_parameters(cfg: RunConfig) -> dict[str, Any]:
    """θ(0) of the run's model, as the server builds it (seeded)."""
    import torch

    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(cfg.model_preset, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len))
    return {name: p.detach() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------- (b) strategy alone
def lazy_replies(requests: list[Message], shapes: Mapping[str, tuple[int, ...]]) -> Iterator[Message]:
    """One synthetic fp32 reply per request, each built only when the consumer asks for it.

    The gradients all have about the same norm, so none is held back as an outlier.
    """
    for i, request in enumerate(requests):
        value = 1e-3 * (1 + i % 2)
        metrics = {"tokens": 64, "train_loss": 5.0, "compute_seconds": 1.0, "idle_seconds": 0.0,
                   "partition_id": i}
        # Built inline so that no local keeps the arrays alive after the message is consumed.
        yield Message(content=train_reply_content({
            "outer_gradient": {n: np.full(shape, value, np.float32) for n, shape in shapes.items()},
            "metrics": metrics}), reply_to=request)


def measure_strategy(cfg: RunConfig) -> dict[str, Any]:
    """Peak memory of one `aggregate_train` over `cfg.num_clients` lazily built replies."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.diloco import DiLoCo

    # One thread: on a shared machine, the checks on every tensor run several times faster.
    torch.set_num_threads(1)
    # Messages are stamped with the running task's ids; outside Flower, make some up.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    params = model_parameters(cfg)
    strategy = DiLoCo.from_config(cfg, params, node_ids=list(range(100, 100 + cfg.num_clients)))
    requests = list(strategy.configure_train(1))
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    del params
    memory = PeakMemory()
    memory.start()
    strategy.aggregate_train(1, lazy_replies(requests, shapes))
    peaks = memory.lap()
    memory.stop()
    participants = strategy.history[-1].participants
    if participants != cfg.num_clients:
        raise RuntimeError(f"only {participants} of {cfg.num_clients} synthetic replies were accepted")
    return {"baseline": memory.baseline, **peaks,
            "model_mb": sum(4 * int(np.prod(shape)) for shape in shapes.values()) / MB}


# --------------------------------------------------------------------------- (a) simulation
def flower_reply_store() -> dict | None:
    """The replies Flower's in-memory LinkState holds, by id (None if it cannot be found:
    this looks into Flower's internals, which may change)."""
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return None
    states = [o for o in gc.get_objects() if isinstance(o, InMemoryLinkState)]
    return states[0].message_res_store if len(states) == 1 else None


def measure_simulation(cfg: RunConfig) -> dict[str, Any]:
    """Peak memory of this process (the ServerApp's) over the rounds of a real simulation."""
    import fl_diloco.server_app as server_app
    from fl_diloco.reporting import METRICS_NAME
    from fl_diloco.simulation import simulate
    from strategies.diloco import DiLoCo

    memory = PeakMemory()
    rounds: list[dict[str, Any]] = []
    store: dict | None = None

    class MeasuredDiLoCo(DiLoCo):
        """DiLoCo that takes the baseline when round 1 opens and the peaks as each round closes."""

        def configure_train(self, server_round, *args, **kwargs):
            nonlocal store
            if server_round == 1:
                store = flower_reply_store()
                memory.start()
            return super().configure_train(server_round, *args, **kwargs)

        def aggregate_train(self, server_round, replies):
            queued: list[int] = []

            def noting_queue(messages: Iterable[Message]) -> Iterator[Message]:
                for message in messages:
                    if store is not None:
                        queued.append(len(store))
                    yield message

            result = super().aggregate_train(server_round, noting_queue(replies))
            # Since the previous lap: this round's messages going out, its replies coming in,
            # and their aggregation.
            rounds.append({**memory.lap(), "queued": max(queued) if store is not None else None})
            return result

    # run_server builds its strategy through this module's name; the ClientApps run in other
    # processes and never see the subclass.
    server_app.DiLoCo = MeasuredDiLoCo
    summary = simulate(cfg)
    memory.stop()
    if len(rounds) != cfg.flower_rounds:
        raise RuntimeError("the run did not go through the measured strategy; see the log above")
    records = [json.loads(line) for line in (Path(cfg.out_dir) / METRICS_NAME).read_text().splitlines()]
    return {"baseline": memory.baseline,
            "peak_mb": max(r["peak_mb"] for r in rounds),
            "peak_private_mb": max(r["peak_private_mb"] for r in rounds),
            "round_peaks_mb": [round(r["peak_mb"], 1) for r in rounds],
            "round_private_peaks_mb": [round(r["peak_private_mb"], 1) for r in rounds],
            "round_queued": [r["queued"] for r in rounds],
            "participants": [r["participants"] for r in records if r["round"] >= 1],
            "model_mb": 4 * summary["num_parameters"] / MB}


# --------------------------------------------------------------------------- driver
def make_config(args: argparse.Namespace, clients: int, out_dir: str) -> RunConfig:
    return RunConfig.from_mapping({
        "algorithm": "diloco", "model": args.model, "num_clients": clients,
        "inner_steps": args.inner_steps, "rounds": args.rounds, "batch_size": 2, "seq_len": 32,
        "max_documents": args.max_documents, "eval_sequences": 16,
        "eval_every": args.rounds + 1,  # only the final evaluation, after the measured window
        "warmup_steps": 1, "threads_per_worker": 1, "device": "cpu", "out_dir": out_dir,
        "overwrite": True,  # a rerun with the same --work-dir replaces this bench's own run
    })


def run_child(mode: str, args: argparse.Namespace, clients: int, work_dir: Path) -> dict[str, Any]:
    """Measure `mode` ("simulation" or "strategy") for M = `clients` in a fresh Python process."""
    result = work_dir / f"{mode}-{clients}.json"
    log = work_dir / f"{mode}-{clients}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--clients", str(clients),
               "--model", args.model, "--rounds", str(args.rounds), "--inner-steps", str(args.inner_steps),
               "--max-documents", str(args.max_documents), "--result", str(result),
               "--work-dir", str(work_dir)]
    began = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{mode} with M={clients} failed (exit {done.returncode}); end of {log}:\n{tail}")
    return {**json.loads(result.read_text()), "process_seconds": round(time.perf_counter() - began, 1)}


def child_main(args: argparse.Namespace) -> int:
    check_platform()
    (clients,) = args.clients
    cfg = make_config(args, clients, str(args.work_dir / f"run-{clients}"))
    figures = measure_simulation(cfg) if args.child == "simulation" else measure_strategy(cfg)
    Path(args.result).write_text(json.dumps(figures))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[4, 16], help="values of M (default 4 16)")
    p.add_argument("--model", default="small",
                   help="model preset or alias (default small = tiny-10m, 41 MB in fp32)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each simulation (default 3)")
    p.add_argument("--inner-steps", type=int, default=2, help="inner steps per round (default 2)")
    p.add_argument("--max-documents", type=int, default=50,
                   help="corpus documents; every client's shard must hold a batch (default 50)")
    p.add_argument("--skip-simulation", action="store_true", help="measure the strategy alone")
    p.add_argument("--skip-strategy", action="store_true", help="measure the simulation only")
    p.add_argument("--work-dir", type=Path, default=None, help="runs and logs (default: a temp dir)")
    # Internal: one measurement, in the process that runs it.
    p.add_argument("--child", choices=("simulation", "strategy"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def report(model: str, results: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Print the table; returns the figures for the JSON line."""
    print(f"\nServer memory while aggregating, model {model}")
    print("  simulation = the ServerApp's process, Flower's simulation runtime included (module docstring)")
    print("  strategy   = DiLoCo.aggregate_train alone, over lazily built replies")
    print("  copies     = growth / fp32 bytes of the model; private = RssAnon, without shared memory\n")
    header = (f"{'measured':<11}{'M':>4}{'model MB':>10}{'baseline MB':>13}{'peak MB':>10}"
              f"{'growth MB':>11}{'copies':>8}{'private copies':>16}")
    print(header)
    print("-" * len(header))
    figures: dict[str, Any] = {"model": model}
    for mode, per_m in results.items():
        figures[mode] = {}
        for clients, raw in per_m.items():
            row = {"model_copy_mb": round(raw["model_mb"], 2), **growth(raw["baseline"], raw, raw["model_mb"])}
            print(f"{mode:<11}{clients:>4}{row['model_copy_mb']:>10.1f}{row['baseline_mb']:>13.1f}"
                  f"{row['peak_mb']:>10.1f}{row['growth_mb']:>11.1f}{row['growth_model_copies']:>8.2f}"
                  f"{row['private_growth_model_copies']:>16.2f}")
            extra = {k: raw[k] for k in ("round_peaks_mb", "round_private_peaks_mb", "round_queued",
                                         "participants", "process_seconds") if k in raw}
            figures[mode][str(clients)] = {**row, **extra}
    for clients, raw in results.get("simulation", {}).items():
        print(f"\nsimulation M={clients}: participants per round {raw['participants']}; per round: "
              f"peak MB {raw['round_peaks_mb']}, private peak MB {raw['round_private_peaks_mb']}, "
              f"most replies queued in Flower {raw['round_queued']}; {raw['process_seconds']:.0f}s in all")
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    check_platform()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="fl-diloco-memory-"))).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    modes = [m for m, skip in (("strategy", args.skip_strategy), ("simulation", args.skip_simulation))
             if not skip]
    results: dict[str, dict[int, dict]] = {}
    for mode in modes:
        results[mode] = {}
        for clients in args.clients:
            print(f"measuring {mode}, M={clients} ...", flush=True)
            results[mode][clients] = run_child(mode, args, clients, work_dir)
    figures = report(make_config(args, 1, str(work_dir)).model_preset, results)
    print(f"\nlogs and runs in {work_dir}")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
