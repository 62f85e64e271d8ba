"""The worker: its outer gradient drives DiLoCo exactly, its state stays resident between
rounds, and its process is private to its owner and never outlives its node."""

import multiprocessing.connection
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from clients.channel import KEY_NAME, SOCKET_NAME, WorkerError, WorkerHandle
from clients.worker import Worker, build_trainer
from tests.conftest import small_config
from tests.in_process import run_in_process
from tests.tolerance import assert_same_trajectory


def test_one_worker_with_unit_outer_lr_and_no_momentum_is_plain_adamw(tmp_path):
    # M = 1, η = 1, μ = 0: θ(t) = θ(t−1) − Δ = θ_local(t), so DiLoCo must reproduce an
    # uninterrupted AdamW run step for step. A wrong sign, a lost optimizer state or a
    # reset data stream between rounds all break this.
    cfg = small_config(tmp_path, num_clients=1, outer_lr=1.0, outer_momentum=0.0)
    strategy, (worker,) = run_in_process(cfg)
    plain = build_trainer(cfg, 0, 1, "cpu")
    start = plain.parameters_fp32()
    for _ in range(cfg.total_inner_steps):
        plain.train_step()
    # θ − (θ − θ_local) equals θ_local only up to fp32 rounding, and AdamW's normalised
    # update can amplify a rounding-level difference on a parameter whose gradient is ~0
    # (tests/tolerance.py); a real fault moves every parameter by ~lr = 3e-3.
    assert_same_trajectory(strategy.params, plain.parameters_fp32(), start)
    assert worker.trainer.step == cfg.total_inner_steps


def test_worker_state_stays_resident_between_rounds(tmp_path):
    cfg = small_config(tmp_path, num_clients=1, rounds=2)
    _, (worker,) = run_in_process(cfg)
    optimizer_steps = {int(s["step"]) for s in worker.trainer.optimizer.state.values()}
    assert optimizer_steps == {2 * cfg.inner_steps}  # AdamW state was never rebuilt
    metrics = worker._replies[2]["metrics"]
    assert metrics["inner_step"] == 2 * cfg.inner_steps and metrics["idle_seconds"] >= 0.0


def test_worker_reports_errors_instead_of_crashing(tmp_path):
    cfg = small_config(tmp_path)
    answer = Worker().handle({"kind": "prepare", "run_config": cfg.to_dict(), "partition_id": 0,
                              "num_partitions": 2, "params": {}})  # no parameters at all
    assert "error" in answer and "KeyError" in answer["error"]
    # A fresh worker (its predecessor died) asks the server for the state instead of training.
    assert Worker().handle({"kind": "train", "round": 1}) == {"needs_state": True}


@pytest.fixture
def spawned_worker():
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    handle = WorkerHandle(run_id=4242, node_id=int(time.time() * 1000) % 100000)
    handle.ensure_running(watch_pid=watched.pid, idle_timeout=60)
    yield handle, watched
    watched.kill()
    watched.wait()


def _worker_pid(handle):
    return handle.call({"kind": "ping"}, timeout=10)["pid"]


def _wait_gone(pid, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_channel_is_private_to_its_owner(spawned_worker):
    handle, _ = spawned_worker
    assert stat.S_IMODE(handle.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((handle.directory / KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((handle.directory / SOCKET_NAME).stat().st_mode) & 0o077 == 0
    # Someone who can reach the socket but lacks the key cannot drive the worker.
    with pytest.raises(multiprocessing.AuthenticationError):
        multiprocessing.connection.Client(str(handle.directory / SOCKET_NAME), family="AF_UNIX",
                                          authkey=b"not-the-key")
    assert handle.is_running()  # and the failed attempt did not take the worker down


def test_worker_exits_when_its_node_goes_away(spawned_worker):
    handle, watched = spawned_worker
    pid = _worker_pid(handle)
    watched.kill()
    watched.wait()
    assert _wait_gone(pid), "worker outlived the process it was watching"


def test_shutdown_stops_the_worker_and_removes_its_directory(spawned_worker):
    handle, _ = spawned_worker
    pid = _worker_pid(handle)
    handle.call({"kind": "shutdown"}, timeout=10)
    assert _wait_gone(pid)
    assert not handle.directory.exists()
    with pytest.raises(WorkerError):
        handle.call({"kind": "ping"}, timeout=5)
