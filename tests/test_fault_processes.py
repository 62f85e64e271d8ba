"""Faults with real processes: `fl-diloco train` (a real Flower simulation) killed with
SIGKILL and resumed, and a worker process killed in the middle of a run."""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fl_diloco.checkpoint import training_checkpoints

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model=tiny", "inner_steps=4", "batch_size=4", "seq_len=32", "max_documents=150",
         "eval_sequences=32", "eval_every=1", "warmup_steps=2", "threads_per_worker=1"]


def _short_dir(tag: str) -> Path:
    # Worker sockets live in the runtime dir: AF_UNIX paths must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix=f"fld-{tag}-"))


def _train(args, runtime_dir, log_path):
    env = {**os.environ, "FL_DILOCO_RUNTIME_DIR": str(runtime_dir), "FLWR_TELEMETRY_ENABLED": "0"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fl_diloco.main", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, process, seconds, what, log_path):
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n"
                                 + Path(log_path).read_text()[-4000:])
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} after {seconds}s:\n" + Path(log_path).read_text()[-4000:])
        time.sleep(0.2)


def _records(out_dir):
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _worker_pids(runtime_dir):
    """Worker processes whose sockets live under `runtime_dir` (this test's only)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"clients.worker_process" in cmdline and any(str(runtime_dir).encode() in a for a in cmdline):
            pids.append(int(proc.name))
    return pids


def _kill_session(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def test_sigkilled_training_resumes_from_its_latest_checkpoint(tmp_path):
    out_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    args = [*SMALL, "num_clients=2", "rounds=6", "checkpoint_every=1", "keep_checkpoints=2",
            f"out_dir={out_dir}"]
    process = _train(args, _short_dir("kill"), log_path)
    try:
        _wait_for(lambda: any(p.name == "round-000004" for p in training_checkpoints(out_dir)),
                  process, 400, "checkpoint of round 4", log_path)
    finally:
        _kill_session(process)  # the whole simulation: ServerApp, Ray, workers
    before = {r["round"]: r for r in _records(out_dir)}
    assert 4 in before and not (out_dir / "summary.json").exists()
    # Resume from the older checkpoint (round 3), so round 4 is computed a second time.
    newest = training_checkpoints(out_dir)[-1]
    newest.rename(tmp_path / newest.name)

    resumed = _train([f"resume={out_dir}"], _short_dir("resume"), log_path)
    try:
        assert resumed.wait(timeout=400) == 0, log_path.read_text()[-4000:]
    finally:
        _kill_session(resumed)
    assert "resuming from" in log_path.read_text()
    after = {r["round"]: r for r in _records(out_dir)}
    assert sorted(after) == list(range(7))
    # Same θ, outer momentum, data positions and (node-local) AdamW moments: round 4 again
    # gives the same model.
    assert after[4]["eval_loss"] == pytest.approx(before[4]["eval_loss"], abs=1e-4)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["rounds"] == 6 and math.isfinite(summary["final_eval_loss"])
    assert summary["config"]["inner_steps"] == 4  # the checkpoint's config, not the defaults


def test_a_killed_worker_process_is_restarted_and_rejoins(tmp_path):
    out_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    runtime = _short_dir("worker")
    args = [*SMALL, "num_clients=3", "rounds=8", "checkpoint_every=0", "outer_lr=0.3",
            f"out_dir={out_dir}"]
    process = _train(args, runtime, log_path)
    try:
        _wait_for(lambda: len(_records(out_dir)) >= 3, process, 240, "round 2", log_path)
        workers = _worker_pids(runtime)
        assert len(workers) == 3
        os.kill(workers[1], signal.SIGKILL)
        assert process.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        _kill_session(process)
    participants = [r["participants"] for r in _records(out_dir) if r["round"]]
    assert 2 in participants, participants  # a round closed with the survivors
    assert participants[-1] == 3, participants  # the restarted worker took the state and rejoined
    assert "sent it the state" in log_path.read_text()


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    yield
    for runtime in Path(tempfile.gettempdir()).glob("fld-*-*"):
        for pid in _worker_pids(runtime):
            os.kill(pid, signal.SIGKILL)
