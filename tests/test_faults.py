"""Faults (issue 5): workers that die and come back, a server that dies and resumes, and
checkpoints that are damaged. The real ServerApp loop runs against real workers through
tests/fake_grid.py; test_fault_processes.py repeats the server kill with real processes."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_diloco.checkpoint import (OUTER_STATE_NAME, WEIGHTS_NAME, CheckpointError, load_training_checkpoint,
                                  training_checkpoints)
from fl_diloco.config import RunConfig
from fl_diloco.server_app import run_server
from strategies.diloco import CONFIG_KEY, METRICS_KEY, OUTER_GRADIENT_KEY, DiLoCo
from strategies.outer_optimizer import OuterOptimizer, eager_outer_gradient, zeros_like
from strategies.wire import to_array_record
from tests.conftest import small_config
from tests.fake_grid import FakeGrid, ServerKilled


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cfg, grid):
    try:
        return run_server(grid, cfg)
    finally:
        grid.stop_all()


@pytest.mark.parametrize("algorithm", ["diloco", "eager"])
def test_a_worker_that_dies_mid_round_is_left_out_then_resyncs_and_contributes_again(tmp_path, algorithm):
    # outer_lr 0.3: at H = 4, eager at 0.7 overshoots even without a fault.
    cfg = small_config(tmp_path, algorithm=algorithm, num_clients=3, rounds=6, checkpoint_every=0,
                       outer_lr=0.3)
    grid = FakeGrid(3)
    grid.crash_at.add((101, 2))
    summary = _run(cfg, grid)
    records = {r["round"]: r for r in _records(tmp_path / "run")}
    participants = {r: record["participants"] for r, record in records.items() if r}
    assert participants[1] == 3 and participants[2] == 2  # round 2 closes with the survivors
    # A site that failed is not one that sent hostile input.
    assert records[2]["unavailable_nodes"] == [101] and records[2]["rejected"] == 0
    # The fresh worker asks for the state, gets it, and is counted again a few rounds later.
    assert participants[6] == 3
    assert min(r for r, p in participants.items() if r > 2 and p == 3) <= 3 + grid_in_flight(cfg)
    assert math.isfinite(summary["final_eval_loss"])
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 1.0
    rejoined = grid.workers[101]
    assert rejoined.start_round >= 2 and rejoined.trainer.step == cfg.total_inner_steps


def grid_in_flight(cfg):
    return max(1, cfg.staleness * cfg.num_fragments)


def test_a_silent_node_does_not_hold_the_round_past_the_timeout(tmp_path, caplog):
    cfg = small_config(tmp_path, num_clients=3, rounds=4, round_timeout=3.0, checkpoint_every=0)
    grid = FakeGrid(3)
    grid.silent_at.add((102, 2))
    _run(cfg, grid)
    records = {r["round"]: r for r in _records(tmp_path / "run")}
    assert records[2]["participants"] == 2
    assert records[2]["unavailable"] == 1 and records[2]["unavailable_nodes"] == [102]
    assert records[3]["participants"] == 3  # the node was only silent, its worker kept its state
    assert "round 2: node 102 failed: no reply within round_timeout=3s" in caplog.text


def test_a_node_the_superlink_lost_is_named_and_counted_apart_from_rejected_replies(tmp_path, caplog):
    """The SuperLink answers for a node that stopped sending heartbeats with an error from
    itself (src_node_id 1): the failure must name the node that was asked."""
    cfg = small_config(tmp_path, num_clients=3, rounds=4, checkpoint_every=0, round_timeout=60.0)
    grid = FakeGrid(3)
    grid.unavailable_at.add((101, 2))
    summary = _run(cfg, grid)
    records = {r["round"]: r for r in _records(tmp_path / "run")}
    assert [(records[r]["unavailable"], records[r]["unavailable_nodes"]) for r in (1, 2, 3, 4)] == [
        (0, []), (1, [101]), (0, []), (0, [])]
    assert all(records[r]["rejected"] == 0 for r in (1, 2, 3, 4))
    assert records[2]["participants"] == 2 and records[4]["participants"] == 3
    assert summary["unavailable_node_rounds"] == 1 and summary["rejected_replies"] == 0
    assert "round 2: node 101 failed: Error: Node Unavailable" in caplog.text
    assert "node 1 failed" not in caplog.text


def test_a_node_lost_before_round_1_is_named_too(tmp_path, caplog):
    cfg = small_config(tmp_path, startup_timeout=60.0)
    grid = FakeGrid(2)
    grid.unavailable_at.add((101, 0))
    with pytest.raises(RuntimeError, match=r"nodes \[101\]"):
        _run(cfg, grid)
    assert "node 101 could not prepare its worker: Error: Node Unavailable" in caplog.text
    assert "node 1 could not" not in caplog.text


def test_a_joiner_starts_from_the_servers_state(tmp_path):
    """The state a restarted worker receives is the server's θ and momentum after the round,
    and its data stream is where a worker that never stopped would be."""
    cfg = small_config(tmp_path, num_clients=2, rounds=4, checkpoint_every=0)
    grid = FakeGrid(2)
    grid.crash_at.add((100, 3))
    _run(cfg, grid)
    joiner, survivor = grid.workers[100], grid.workers[101]
    assert joiner.start_round in (3, 4)
    # Both now hold the same replica of the global outer state (diloco).
    for f_joiner, f_survivor in zip(joiner.fragments, survivor.fragments):
        for name in f_joiner.outer.params:
            torch.testing.assert_close(f_joiner.outer.params[name], f_survivor.outer.params[name])
            torch.testing.assert_close(f_joiner.outer.momentum_buffer[name],
                                       f_survivor.outer.momentum_buffer[name])


@pytest.mark.parametrize("algorithm", ["diloco", "delayed", "eager"])
def test_killed_server_resumes_from_its_latest_checkpoint(tmp_path, algorithm):
    base = dict(num_clients=2, rounds=6, checkpoint_every=1, keep_checkpoints=2, algorithm=algorithm,
                outer_lr=0.3)
    reference = _run(small_config(tmp_path / "ref", **base), FakeGrid(2))

    cfg = small_config(tmp_path, **base)
    grid = FakeGrid(2)
    grid.kill_server_at = 5  # dies as it opens round 5, before round 4's checkpoint is written
    with pytest.raises(ServerKilled):
        _run(cfg, grid)
    out_dir = tmp_path / "run"
    assert [p.name for p in training_checkpoints(out_dir)] == ["round-000002", "round-000003"]  # pruned
    before = {r["round"]: r for r in _records(out_dir)}

    # A resume names only the run directory: every other key comes from the checkpoint.
    resumed_cfg = RunConfig.from_mapping({"resume": str(out_dir)})
    summary = _run(resumed_cfg, FakeGrid(2))
    after = {r["round"]: r for r in _records(out_dir)}
    assert sorted(after) == list(range(7))
    for r in range(4):  # rounds the checkpoint holds keep their records; round 4 is redone
        assert after[r] == before[r]
    # The checkpoint holds θ, the outer momentum, the averages in flight and the data
    # positions, and each node kept its worker's AdamW moments: diloco and delayed workers
    # hold replicas of that state, so the resumed run continues the uninterrupted one exactly.
    # Eager workers each had their own θ_m; they resume from their mean, without their own
    # stale outer gradients: a small perturbation, within noise.
    reference_curve = [r["eval_loss"] for r in _records(tmp_path / "ref" / "run")]
    tolerance = 0.05 if algorithm == "eager" else 1e-4
    assert [after[r]["eval_loss"] for r in range(7)] == pytest.approx(reference_curve, abs=tolerance)
    assert summary["tokens"] == reference["tokens"]


def test_resume_refuses_a_config_that_computes_something_else(tmp_path):
    cfg = small_config(tmp_path, rounds=2, checkpoint_every=1)
    _run(cfg, FakeGrid(2))
    with pytest.raises(CheckpointError, match="inner_lr"):
        _run(small_config(tmp_path, resume=str(tmp_path / "run"), out_dir="", inner_lr=0.01), FakeGrid(2))


@pytest.mark.parametrize("damaged", [WEIGHTS_NAME, OUTER_STATE_NAME, "state.json"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_overwritten(tmp_path, damaged):
    cfg = small_config(tmp_path, rounds=2, checkpoint_every=1)
    _run(cfg, FakeGrid(2))
    out_dir = tmp_path / "run"
    latest = training_checkpoints(out_dir)[-1]
    target = latest / damaged
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # truncated
    snapshot = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=str(target) if damaged != "state.json" else "state.json"):
        load_training_checkpoint(out_dir)
    with pytest.raises(CheckpointError, match=damaged):
        _run(small_config(tmp_path, resume=str(out_dir), out_dir=""), FakeGrid(2))
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == snapshot


def test_eager_takes_m_as_the_rounds_participant_count():
    """With one of three workers gone, the server's eager update mixes the fresh average with
    weight 1/2, the round's participant count, and the workers are told M = 2."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    params = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    strategy = DiLoCo(params, node_ids=[1, 2, 3], algorithm="eager", delay=1, outer_lr=0.5,
                      outer_momentum=0.9)
    expected = OuterOptimizer({"w": params["w"].clone()}, 0.5, 0.9)

    def reply(request, value):
        metrics = MetricRecord({"train_loss": 1.0, "tokens": 10, "compute_seconds": 1.0, "idle_seconds": 0.0})
        grads = to_array_record({"w": np.full((2, 3), value, np.float32)})
        return Message(content=RecordDict({OUTER_GRADIENT_KEY: grads, METRICS_KEY: metrics}), reply_to=request)

    requests = list(strategy.configure_train(1))
    strategy.aggregate_train(1, [reply(r, v) for r, v in zip(requests, (1.0, 2.0, 3.0))])
    average_1 = {"w": torch.full((2, 3), 2.0)}
    expected.step(eager_outer_gradient(zeros_like(average_1), average_1, zeros_like(average_1), 1 / 3))
    requests = list(strategy.configure_train(2))
    assert all(r.content[CONFIG_KEY]["participants"] == 3 for r in requests)
    strategy.aggregate_train(2, [reply(requests[0], 4.0), reply(requests[2], 6.0)])  # node 2 is gone
    average_2 = {"w": torch.full((2, 3), 5.0)}
    expected.step(eager_outer_gradient(average_1, average_2, average_1, 1 / 2))
    torch.testing.assert_close(strategy.params["w"], expected.params["w"])
    requests = list(strategy.configure_train(3))
    assert [r.content[CONFIG_KEY]["participants"] for r in requests] == [2, 2, 2]
    assert [r.content[CONFIG_KEY]["counted"] for r in requests] == [True, False, True]
