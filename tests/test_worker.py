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
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.channel import KEY_NAME, SOCKET_NAME, WorkerError, WorkerHandle
from clients.worker import Worker, build_trainer
from strategies.diloco import METRICS_KEY, OUTER_GRADIENT_KEY, PARAMS_KEY, DiLoCo
from strategies.wire import from_array_record, to_array_record
from tests.conftest import small_config


def _train_request(cfg, server_round, params, partition=0):
    return {"kind": "train", "round": server_round, "run_config": cfg.to_dict(),
            "partition_id": partition, "num_partitions": cfg.num_clients, "params": params}


def _run_diloco_in_process(cfg, rounds):
    """DiLoCo with one worker, through the real strategy and Worker, minus the transport."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    worker = Worker()
    reference = build_trainer(cfg, 0, 1, "cpu")  # same seed: the same initial model
    strategy = DiLoCo(reference.parameters_fp32(), node_ids=[1], outer_lr=cfg.outer_lr,
                      outer_momentum=cfg.outer_momentum)
    for server_round in range(1, rounds + 1):
        (request,) = strategy.configure_train(server_round)
        answer = worker.handle(_train_request(cfg, server_round, from_array_record(request.content[PARAMS_KEY])))
        assert "error" not in answer, answer.get("error")
        reply = Message(content=RecordDict({OUTER_GRADIENT_KEY: to_array_record(answer["outer_gradient"]),
                                            METRICS_KEY: MetricRecord(answer["metrics"])}), reply_to=request)
        strategy.aggregate_train(server_round, [reply])
    return strategy, worker


def test_one_worker_with_unit_outer_lr_and_no_momentum_is_plain_adamw(tmp_path):
    # M = 1, η = 1, μ = 0: θ(t) = θ(t−1) − Δ = θ_local(t), so DiLoCo must reproduce an
    # uninterrupted AdamW run step for step. A wrong sign, a lost optimizer state or a
    # reset data stream between rounds all break this.
    cfg = small_config(tmp_path, num_clients=1, outer_lr=1.0, outer_momentum=0.0)
    rounds = 3
    strategy, worker = _run_diloco_in_process(cfg, rounds)
    plain = build_trainer(cfg, 0, 1, "cpu")
    for _ in range(rounds * cfg.inner_steps):
        plain.train_step()
    # θ − (θ − θ_local) equals θ_local only up to fp32 rounding, and AdamW's normalised
    # update can amplify a rounding-level difference on a parameter whose gradient is ~0.
    # 1e-4 is far below what any real fault produces (every parameter off by ~lr = 3e-3).
    for name, value in plain.parameters_fp32().items():
        torch.testing.assert_close(strategy.params[name], value, rtol=0, atol=1e-4)
    assert worker.trainer.step == rounds * cfg.inner_steps


def test_worker_state_stays_resident_between_rounds(tmp_path):
    cfg = small_config(tmp_path, num_clients=1)
    _, worker = _run_diloco_in_process(cfg, 2)
    trainer = worker.trainer
    optimizer_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert optimizer_steps == {2 * cfg.inner_steps}  # AdamW state was never rebuilt
    assert worker.last_reply["metrics"]["inner_step"] == 2 * cfg.inner_steps
    assert worker.last_reply["metrics"]["idle_seconds"] >= 0.0


def test_worker_reports_errors_instead_of_crashing(tmp_path):
    cfg = small_config(tmp_path)
    answer = Worker().handle(_train_request(cfg, 1, params={}))  # no parameters at all
    assert "error" in answer and "KeyError" in answer["error"]


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
