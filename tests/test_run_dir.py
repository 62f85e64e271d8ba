"""A run never destroys or mixes another run's data (fl_diloco/run_dir.py): a second run into a
used out_dir refuses before anything is written, `overwrite=true` replaces the run whole, a
resume continues only the directory's own run, and default directories never collide. The real
ServerApp loop runs against real workers through tests/fake_grid.py."""

import json
import shutil
from pathlib import Path

import pytest

from clients.worker import optimizer_state_dir
from fl_diloco import cli, run_dir
from fl_diloco.checkpoint import CheckpointError, load_training_checkpoint, training_checkpoints
from fl_diloco.config import ConfigError, RunConfig
from fl_diloco.dp_baseline import train_data_parallel
from fl_diloco.resume import load_resume
from fl_diloco.server_app import run_server
from tests.conftest import small_config
from tests.fake_grid import FakeGrid, ServerKilled

REFUSAL = r"already holds a run .*; continue that run with resume=.*overwrite=true"


def _run(cfg, grid=None):
    grid = grid or FakeGrid(cfg.num_clients)
    try:
        return run_server(grid, cfg)
    finally:
        grid.stop_all()


def _snapshot(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _rounds(out_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished 4-round run (checkpoints round-3 and round-4), trained once; tests copy it."""
    root = tmp_path_factory.mktemp("first")
    _run(small_config(root, rounds=4, checkpoint_every=1))
    return root / "run"


@pytest.fixture
def used(first_run, tmp_path):
    return shutil.copytree(first_run, tmp_path / "run")


def test_a_second_run_into_a_used_out_dir_refuses_and_touches_nothing(used, tmp_path):
    # The reproduction: once the first run has finished, a shorter one with another seed.
    before = _snapshot(used)
    second = small_config(tmp_path, rounds=2, checkpoint_every=1, seed=1)
    grid = FakeGrid(2)
    with pytest.raises(ConfigError, match=REFUSAL):
        _run(second, grid)  # what `flwr run` reaches: the ServerApp refuses too
    assert grid.threads == []  # not one message to a node
    assert _snapshot(used) == before  # nor a failed.json in the other run's directory
    # `fl-diloco train` refuses before Ray, in one line, with exit status 2.
    for runner in (cli.run_job, train_data_parallel):
        with pytest.raises(ConfigError, match=REFUSAL):
            runner(second.replace(algorithm="dp") if runner is train_data_parallel else second)
    assert _snapshot(used) == before


def test_the_cli_refuses_a_used_out_dir_in_one_line(used, capsys):
    assert cli.main(["train", f"out_dir={used}", "rounds=2", "seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: out_dir={used} already holds a run (checkpoint, checkpoints, "
                          "loss_vs_tokens.png, metrics.jsonl, summary.json); continue that run with resume=")
    assert "\n" not in err


def test_overwrite_replaces_the_run_whole(used, tmp_path):
    old_id = run_dir.read_run_id(used)
    (used / "notes.txt").write_text("mine")  # not fl-diloco's: overwrite leaves it
    # The first run's node-local AdamW moments, as a killed run leaves them (its round 4 is the newest).
    cfg = small_config(tmp_path, rounds=2, checkpoint_every=1, seed=1, overwrite=True)
    moments = optimizer_state_dir(cfg.replace(out_dir=str(used.resolve())), 0)
    moments.mkdir(parents=True)
    for r in (3, 4):
        (moments / f"round-{r:06d}.pt").write_bytes(b"the first run's")
    grid = FakeGrid(2)
    grid.kill_server_at = 3  # so that the second run's own moments stay to be looked at
    with pytest.raises(ServerKilled):
        _run(cfg.replace(rounds=3), grid)
    assert not (moments / "round-000004.pt").exists()  # none of the first run's moments is left
    assert (moments / "round-000001.pt").read_bytes() != b"the first run's"

    summary = _run(cfg)
    assert _rounds(used) == [0, 1, 2]
    assert [p.name for p in training_checkpoints(used)] == ["round-000001", "round-000002"]
    assert json.loads((used / "config.json").read_text())["seed"] == 1 and summary["config"]["seed"] == 1
    assert run_dir.read_run_id(used) not in (None, old_id)
    assert load_training_checkpoint(used).meta["run_id"] == run_dir.read_run_id(used)
    assert (used / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_checkpoint_of_another_run(used, first_run, tmp_path):
    second = small_config(tmp_path, rounds=2, checkpoint_every=1, seed=1, overwrite=True)
    grid = FakeGrid(2)
    grid.kill_server_at = 2  # stopped after round 1's checkpoint
    with pytest.raises(ServerKilled):
        _run(second, grid)
    shutil.copytree(first_run / "checkpoints" / "round-000004", used / "checkpoints" / "round-000004")
    before = _snapshot(used)
    with pytest.raises(CheckpointError, match="checkpoint round-000004 was written by run .* mixes two runs"):
        load_resume(RunConfig(resume=str(used)))
    with pytest.raises(CheckpointError, match="mixes two runs"):
        _run(RunConfig(resume=str(used)))
    assert _snapshot(used) == before


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ConfigError, match="overwrite=true would delete the run that resume continues"):
        RunConfig.from_mapping({"resume": "/abs/run", "overwrite": True})


def test_what_a_failed_start_leaves_is_reused_and_anything_else_is_not(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    cfg = RunConfig(out_dir=str(out_dir))
    for name in ("config.json", "run.json", "failed.json"):
        (out_dir / name).write_text("{}")
    run_dir.check_out_dir(cfg)
    prepared = run_dir.prepare_out_dir(cfg)
    assert sorted(p.name for p in prepared.iterdir()) == ["config.json", "run.json"]
    (out_dir / "data.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"holds other files \(data.bin\); choose another out_dir"):
        run_dir.check_out_dir(cfg)
    run_dir.check_out_dir(cfg.replace(overwrite=True))


def test_default_out_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_dir.time, "strftime", lambda _: "20260101-000000")  # the same second
    made = [run_dir.default_out_dir("diloco") for _ in range(3)]
    assert [Path(d).name for d in made] == ["diloco-20260101-000000", "diloco-20260101-000000-2",
                                            "diloco-20260101-000000-3"]
    assert all(Path(d).is_dir() and Path(d).is_absolute() for d in made)
