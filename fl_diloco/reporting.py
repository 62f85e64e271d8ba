"""What a run tells the person who started it: a line per round, metrics.jsonl,
summary.json, a final table and a PNG of loss against tokens."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fl_diloco.atomic import atomic_write
from fl_diloco.console import format_duration, round_progress_bar

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss_vs_tokens.png"
FAILED_NAME = "failed.json"


def compute_utilization(compute_seconds: float, idle_seconds: float) -> float | None:
    """CU: seconds computing over seconds computing or waiting (None when there were none)."""
    busy = compute_seconds + idle_seconds
    return compute_seconds / busy if busy > 0 else None


NO_MFU_NOTE = ("no worker reported an MFU: a CPU has no known peak FLOP/s, nor has a GPU "
               "missing from the table in fl_diloco/flops.py; set peak_flops to get one")


def throughput(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Tokens/s per worker and MFU over `rows` (one worker's rounds, one round's workers, or
    a run's rounds), each with its tokens, compute_seconds and, where known, mfu.

    Tokens/s is all the tokens over all the compute seconds; MFU is the time-weighted mean of
    the rows' MFU (model FLOPs done over peak FLOPs available), None unless every row has one.
    """
    seconds = sum(float(r["compute_seconds"]) for r in rows)
    if not rows or seconds <= 0:
        return None, None
    tokens_per_second = sum(float(r["tokens"]) for r in rows) / seconds
    if any(r.get("mfu") is None for r in rows):
        return tokens_per_second, None
    return tokens_per_second, sum(r["mfu"] * float(r["compute_seconds"]) for r in rows) / seconds


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n:.1f}TB"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


class RunLog:
    """Appends one JSON object per round to metrics.jsonl and prints a readable line.

    `continue_after=r` continues a resumed run's log: it keeps the records up to round r
    (dropping those of rounds the checkpoint does not include) and the wall clock goes on
    from the last of them.
    """

    def __init__(self, out_dir: Path, total_rounds: int, continue_after: int | None = None,
                 tensorboard: bool = False, steps_per_round: int = 1,
                 step_source: Callable[[], int | None] | None = None) -> None:
        self.path = out_dir / METRICS_NAME
        self.total_rounds = total_rounds
        self.records: list[dict[str, Any]] = []
        if continue_after is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["round"] <= continue_after:
                    self.records.append(record)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        elapsed = self.records[-1]["wall_seconds"] if self.records else 0.0
        self.started = time.perf_counter() - elapsed
        # The ETA extrapolates this launch's pace (a resumed run's earlier launches may have
        # run elsewhere): seconds since it began over the rounds it has logged.
        self.launched, self.launch_round = time.perf_counter(), continue_after or 0
        # On a terminal, a bar of inner steps. `step_source` (the slowest worker's published
        # step, where the workers share this machine: clients/progress.py) moves it within a
        # round; without it the bar moves when a round closes.
        self.steps_per_round = steps_per_round
        self.progress_bar = round_progress_bar(total_rounds * steps_per_round,
                                               initial=self.launch_round * steps_per_round,
                                               unit="inner steps" if steps_per_round > 1 else "rounds")
        self._bar_lock = threading.Lock()
        self._closed = threading.Event()
        self._poller = None
        if self.progress_bar is not None and step_source is not None:
            self._poller = threading.Thread(target=self._poll_steps, args=(step_source,),
                                            name="progress", daemon=True)
            self._poller.start()
        self.tensorboard = None
        if tensorboard:
            from fl_diloco.tracking import TensorBoardLog

            self.tensorboard = TensorBoardLog(out_dir)

    def log(self, record: dict[str, Any]) -> None:
        record = {**record, "wall_seconds": time.perf_counter() - self.started}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self.tensorboard.log(record)
        eta = self.eta_seconds(record["round"])
        line = (
            f"[round {record['round']:>3}/{self.total_rounds}] "
            f"train_loss {_fmt(record.get('train_loss'))}  "
            f"eval_loss {_fmt(record.get('eval_loss'))}"
            + (f" ({record['eval_seconds']:.1f}s)  " if record.get("eval_seconds") is not None else "  ")
            + f"tokens/s {_fmt(record.get('tokens_per_second'), '.0f')}  "
            f"per worker {_fmt(record.get('tokens_per_second_per_worker'), '.0f')}  "
            + (f"mfu {record['mfu']:.1%}  " if record.get("mfu") is not None else "")
            + f"up {format_bytes(record.get('bytes_up', 0))}  down {format_bytes(record.get('bytes_down', 0))}"
            + (f"  rejected {record['rejected']}" if record.get("rejected") else "")
            + (f"  failed nodes {record['unavailable_nodes']}" if record.get("unavailable_nodes") else "")
            + (f"  eta {format_duration(eta)}" if eta is not None else "")
        )
        if self.progress_bar is None:
            print(line, flush=True)
        else:
            self.progress_bar.write(line)
            self._advance_bar(record["round"] * self.steps_per_round)

    def _advance_bar(self, step: int) -> None:
        with self._bar_lock:
            if step > self.progress_bar.n:
                self.progress_bar.update(step - self.progress_bar.n)

    def _poll_steps(self, step_source: Callable[[], int | None]) -> None:
        while not self._closed.wait(1.0):
            step = step_source()
            if step is not None:
                self._advance_bar(step)

    def eta_seconds(self, server_round: int) -> float | None:
        """Seconds left if the remaining rounds take as long as this launch's rounds so far."""
        done = server_round - self.launch_round
        if done <= 0:
            return None
        return (time.perf_counter() - self.launched) / done * (self.total_rounds - server_round)

    def close(self) -> None:
        self._closed.set()
        if self._poller is not None:
            self._poller.join()
        if self.progress_bar is not None:
            self.progress_bar.close()
        if self.tensorboard:
            self.tensorboard.close()


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """summary.json, whole or not at all: its presence marks a finished run (fl_diloco/resume.py)."""
    path = out_dir / SUMMARY_NAME
    atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return path


def print_summary_table(summary: dict[str, Any]) -> None:
    rows = [
        ("algorithm", summary["algorithm"]),
        ("clients x inner steps x rounds",
         f"{summary['num_clients']} x {summary['inner_steps']} x {summary['rounds']}"),
        ("tokens", f"{summary['tokens']:,}"),
        ("eval loss first -> final", f"{_fmt(summary['first_eval_loss'])} -> {_fmt(summary['final_eval_loss'])}"),
        ("unigram entropy (nats/token)", _fmt(summary.get("unigram_entropy"))),
        ("wall seconds", _fmt(summary["wall_seconds"], ".1f")),
        ("compute / idle seconds (all workers)",
         f"{_fmt(summary['compute_seconds'], '.1f')} / {_fmt(summary['idle_seconds'], '.1f')}"),
        ("tokens/s per worker (computing)", _fmt(summary.get("tokens_per_second_per_worker"), ".0f")),
        ("MFU", _fmt(summary.get("mfu"), ".1%")),
        ("bytes up / down", f"{format_bytes(summary['bytes_up'])} / {format_bytes(summary['bytes_down'])}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows) + "\n", flush=True)


def plot_loss_vs_tokens(out_dir: Path, records: list[dict[str, Any]], title: str,
                        unigram_entropy: float | None = None) -> Path:
    """Train and eval loss against tokens processed; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    train = [(r["tokens_total"], r["train_loss"]) for r in records
             if r.get("train_loss") is not None and not math.isnan(r["train_loss"])]
    evals = [(r["tokens_total"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss (workers' mean)", alpha=0.7)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held-out)")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", ls="--", lw=1, label="unigram entropy (no context)")
    ax.set_xlabel("tokens processed (all workers)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / PLOT_NAME
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def peak_round_bytes(records: list[dict[str, Any]], num_fragments: int) -> dict[str, Any]:
    """The most bytes one round sent up, next to a full sync's: the P rounds of an outer step
    carry every parameter exactly once (strategies/fragments.py), so their sum is a full sync.
    Streaming exists to make the share about 1/P. Empty for runs without rounds' bytes."""
    sent = {r["round"]: r["bytes_up"] for r in records if r.get("round", 0) >= 1 and "bytes_up" in r}
    steps = [sum(sent[first + i] for i in range(num_fragments)) for first in sent
             if (first - 1) % num_fragments == 0 and all(first + i in sent for i in range(num_fragments))]
    if not steps or not max(steps):
        return {}
    peak, full = max(sent.values()), max(steps)
    return {"peak_round_bytes_up": peak, "full_sync_bytes_up": full, "peak_round_share": peak / full}


def finish_run(out_dir: Path, algorithm: str, cfg: Any, run_log: RunLog, *, compute_seconds: float,
               idle_seconds: float, bytes_up: int, bytes_down: int, extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """Write summary.json and the loss plot, print the final table; returns the summary.

    Every runner (DiLoCo on Flower, the data-parallel baseline) ends here, so their
    summaries have the same fields and can be compared row by row.
    """
    evals = [r for r in run_log.records if r.get("eval_loss") is not None]
    wall = time.perf_counter() - run_log.started
    tokens_per_second, run_mfu = throughput([r for r in run_log.records if r.get("compute_seconds")])
    summary = {
        "algorithm": algorithm,
        "num_clients": cfg.num_clients,
        "inner_steps": cfg.inner_steps,
        "rounds": cfg.rounds,
        "tokens": run_log.records[-1]["tokens_total"] if run_log.records else 0,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "wall_seconds": wall,
        "compute_seconds": compute_seconds,
        "idle_seconds": idle_seconds,
        # Compute utilization: the workers' computing time over the time they existed for.
        "compute_utilization": compute_utilization(compute_seconds, idle_seconds),
        # What one worker's device achieves while it computes (fl_diloco/flops.py for MFU).
        "tokens_per_second_per_worker": tokens_per_second,
        "mfu": run_mfu,
        **({} if run_mfu is not None else {"mfu_note": NO_MFU_NOTE}),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        **peak_round_bytes(run_log.records, cfg.num_fragments),
        "out_dir": str(out_dir),
        **(extra or {}),
        "eval_history": [{"round": r["round"], "tokens": r["tokens_total"], "eval_loss": r["eval_loss"]}
                         for r in evals],
        "config": cfg.to_dict(),
    }
    write_summary(out_dir, summary)
    run_log.close()
    plot_loss_vs_tokens(out_dir, run_log.records,
                        f"{algorithm}: {cfg.model}, M={cfg.num_clients}, H={cfg.inner_steps}",
                        summary.get("unigram_entropy"))
    print_summary_table(summary)
    print(f"outputs in {out_dir}: {SUMMARY_NAME}, {METRICS_NAME}, {PLOT_NAME}, checkpoint/", flush=True)
    return summary


def write_failure(directory: Path, err: BaseException, **context: Any) -> Path:
    """failed.json: the error, its traceback and `context` (e.g. the config), so a run
    directory that has no summary.json says why."""
    failure = {"error": f"{type(err).__name__}: {err}",
               "traceback": "".join(traceback.format_exception(err)), **context}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FAILED_NAME
    atomic_write(path, lambda f: f.write(json.dumps(failure, indent=2).encode()))
    return path


@contextlib.contextmanager
def failure_recorded(out_dir: Path) -> Iterator[None]:
    """A run that fails once its out_dir exists leaves failed.json there, then fails."""
    try:
        yield
    except Exception as err:
        write_failure(out_dir, err)
        raise
