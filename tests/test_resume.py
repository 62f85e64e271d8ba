"""Resume's edges (fl_diloco/resume.py): nothing to resume, a run that is complete, and a
finished run extended with more rounds. The real ServerApp loop runs against real workers
through tests/fake_grid.py; test_faults.py covers a killed server resuming exactly."""

import json
import shutil

import pytest

from clients.inner_loop import inner_lr_at
from fl_diloco.checkpoint import CheckpointError, load_training_checkpoint, training_checkpoints
from fl_diloco.config import ConfigError, RunConfig
from fl_diloco.resume import load_resume, resume_config
from fl_diloco.server_app import run_server
from tests.conftest import small_config
from tests.fake_grid import FakeGrid

ROUNDS = 2  # fewer than checkpoint_every: only the final-round checkpoint exists


def _run(cfg, grid, explicit_keys=()):
    try:
        return run_server(grid, cfg, explicit_keys)
    finally:
        grid.stop_all()


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One finished run per algorithm, trained once for the module; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    runs = {}
    for algorithm in ("diloco", "eager"):
        cfg = small_config(root / algorithm, algorithm=algorithm, rounds=ROUNDS, checkpoint_every=5,
                           outer_lr=0.3)
        _run(cfg, FakeGrid(2))
        runs[algorithm] = root / algorithm / "run"
    return runs


@pytest.fixture
def finished(finished_runs, tmp_path):
    """A copy of the finished diloco run, free to change."""
    return shutil.copytree(finished_runs["diloco"], tmp_path / "run")


def _resume(run_dir, **changes):
    return RunConfig.from_mapping({"resume": str(run_dir), **changes})


def test_a_missing_directory_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=r"resume=\S*/nowhere: no such directory$"):
        load_resume(_resume(tmp_path / "nowhere"))


def test_a_run_killed_before_its_first_checkpoint_says_so(finished):
    shutil.rmtree(finished / "checkpoints")
    (finished / "summary.json").unlink()
    with pytest.raises(CheckpointError, match=r"stopped before its first checkpoint \(checkpoint_every=5\); "
                                              r"nothing to resume, start it again"):
        load_resume(_resume(finished))


@pytest.mark.parametrize("kind", ["not a run", "dp"])
def test_a_directory_that_never_held_a_resumable_run_says_what_it_is(tmp_path, kind):
    run_dir = tmp_path / "dir"
    run_dir.mkdir()
    if kind == "dp":
        (run_dir / "config.json").write_text(json.dumps({"algorithm": "dp"}))
    with pytest.raises(CheckpointError, match="not an fl-diloco run" if kind == "not a run" else "algorithm=dp"):
        load_resume(_resume(run_dir))


def test_every_run_checkpoints_its_final_round(finished_runs):
    for run_dir in finished_runs.values():
        assert [p.name for p in training_checkpoints(run_dir)] == [f"round-{ROUNDS:06d}"]


def test_a_complete_run_is_left_alone_and_nothing_is_started(finished, monkeypatch, capsys):
    snapshot = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    grid = FakeGrid(2)
    summary = _run(_resume(finished), grid)
    assert summary == json.loads((finished / "summary.json").read_text())
    assert grid.threads == []  # not one message to a node
    # `fl-diloco train` stops before Ray, with one sentence.
    import flwr.simulation

    from fl_diloco.simulation import simulate

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **_: pytest.fail("started a simulation"))
    assert simulate(_resume(finished)) == summary
    assert capsys.readouterr().out.strip().endswith(
        f"run {finished} is complete ({ROUNDS} of {ROUNDS} rounds); to train on, pass rounds=N with N > {ROUNDS}")
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == snapshot


@pytest.mark.parametrize("algorithm", ["diloco", "eager"])
def test_a_finished_run_extends_with_more_rounds(finished_runs, tmp_path, algorithm):
    run_dir = shutil.copytree(finished_runs[algorithm], tmp_path / "run")
    before = _records(run_dir)
    grid = FakeGrid(2)
    summary = _run(_resume(run_dir, rounds=ROUNDS + 2), grid)
    after = _records(run_dir)
    assert [r["round"] for r in after] == list(range(ROUNDS + 3))
    assert after[: ROUNDS + 1] == before  # the finished rounds are kept as they were
    assert summary["rounds"] == ROUNDS + 2 and summary["tokens"] == before[-1]["tokens_total"] * 2
    assert after[-1]["eval_loss"] < after[0]["eval_loss"] - 1.0
    for worker in grid.workers.values():  # each took the extension's inner steps, no more
        assert worker.start_round == ROUNDS and worker.trainer.step == (ROUNDS + 2) * 4
    extended = load_training_checkpoint(run_dir)
    assert extended.round == ROUNDS + 2
    saved = json.loads((extended.path / "config.json").read_text())["run_config"]
    assert (saved["rounds"], saved["lr_schedule_rounds"]) == (ROUNDS + 2, ROUNDS)
    # Extended again and then resumed as it is: complete.
    assert _run(_resume(run_dir), FakeGrid(2)) == summary


def test_an_extension_keeps_the_planned_schedule_and_runs_on_at_the_floor():
    planned = RunConfig.from_mapping({"rounds": 4, "inner_steps": 10, "warmup_steps": 5})
    extended = planned.replace(rounds=7, lr_schedule_rounds=4)
    assert [inner_lr_at(s, extended) for s in range(40)] == [inner_lr_at(s, planned) for s in range(40)]
    floor = planned.inner_lr * planned.min_lr_ratio
    assert [inner_lr_at(s, extended) for s in range(40, 70)] == pytest.approx([floor] * 30)


def test_rounds_at_their_default_extend_only_when_given_on_the_command_line(finished):
    state = load_training_checkpoint(finished)
    default_rounds = RunConfig().rounds
    assert resume_config(_resume(finished), state).rounds == ROUNDS  # left out: the checkpoint's
    given = resume_config(_resume(finished), state, explicit_keys={"rounds"})
    assert (given.rounds, given.lr_schedule_rounds) == (default_rounds, ROUNDS)
    # The resolved config resolves to itself (the ServerApp resolves it again).
    assert resume_config(given, state, explicit_keys=given.keys()) == given
    with pytest.raises(CheckpointError, match="can only be extended"):
        resume_config(_resume(finished, rounds=1), state)
    # A default given on the command line is a change like any other (the run warmed up 2 steps).
    with pytest.raises(CheckpointError, match="warmup_steps=30"):
        resume_config(_resume(finished), state, explicit_keys={"warmup_steps"})


def test_a_resumed_runs_summary_covers_every_launch(finished_runs, tmp_path):
    run_dir = shutil.copytree(finished_runs["diloco"], tmp_path / "run")
    first = json.loads((run_dir / "summary.json").read_text())
    summary = _run(_resume(run_dir, rounds=ROUNDS + 2), FakeGrid(2))
    records = _records(run_dir)[1:]
    # Each launch started the workers anew: the summary lists both, and adds them up.
    assert [launch["from_round"] for launch in summary["launches"]] == [0, ROUNDS]
    assert summary["launches"][0] == first["launches"][0]
    for key in ("worker_setup_seconds", "setup_bytes_down"):
        assert summary[key] == pytest.approx(sum(launch[key] for launch in summary["launches"]))
    assert all(launch["worker_setup_seconds"] > 0 for launch in summary["launches"])
    # The rest covers every round, the first launch's too.
    assert summary["bytes_down"] == summary["setup_bytes_down"] + sum(r["bytes_down"] for r in records)
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in records)
    for key in ("compute_seconds", "idle_seconds"):
        assert summary[key] == pytest.approx(sum(r[key] for r in records))
    assert sum(w["compute_seconds"] for w in summary["workers"]) == pytest.approx(summary["compute_seconds"])
    # The wall clock goes on from the first launch's last round (the time between launches is not counted).
    assert summary["wall_seconds"] > records[-1]["wall_seconds"] > records[ROUNDS - 1]["wall_seconds"] > 0
