"""`fl-diloco train -m`: one job per combination into a sweep directory, failures recorded and
passed over, then `fl-diloco report` on it. The last test runs real Flower simulations."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from fl_diloco import cli
from fl_diloco.config import DEFAULTS, RunConfig
from fl_diloco.report import FAILED_NAME, SWEEP_INDEX_NAME
from fl_diloco.report import main as report_main
from tests.conftest import small_config
from tests.test_report import fake_run


def tiny_overrides(tmp_path) -> list[str]:
    """small_config with 2 rounds, as command-line overrides: seconds of training per job."""
    cfg = small_config(tmp_path, rounds=2).to_dict()
    return [f"{k}={v}" for k, v in cfg.items() if k != "out_dir" and v != DEFAULTS[k]]


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training with writing a run's files; a run with outer_lr=0.5 raises."""
    ran: list[RunConfig] = []

    def fake_run_job(cfg: RunConfig, explicit_keys=()) -> dict:
        ran.append(cfg)
        if cfg.outer_lr == 0.5:
            raise RuntimeError("the worker of partition 1 died")
        return fake_run(Path(cfg.out_dir), cfg, [8.0, 7.0 - cfg.seed / 10])

    monkeypatch.setattr(cli, "run_job", fake_run_job)
    return ran


def test_a_sweep_runs_every_job_records_failures_and_exits_nonzero(tmp_path, fake_training, capsys):
    sweep = tmp_path / "sweep"
    argv_before = list(sys.argv)
    # Job 0 fails in training, jobs 1 and 3 (delay=3) fail config validation; job 2 must still run.
    code = cli.main(["train", "-m", "algorithm=eager", "outer_lr=0.5,0.7", "delay=1,3", "rounds=2",
                     f"hydra.sweep.dir={sweep}"])
    assert code == 1
    assert sys.argv == argv_before
    index = json.loads((sweep / SWEEP_INDEX_NAME).read_text())
    assert [job["status"] for job in index["jobs"]] == ["failed", "failed", "completed", "failed"]
    names = [job["job_dir"] for job in index["jobs"]]  # relative: the sweep can be moved
    # Only the swept keys name a job's directory.
    assert names == ["0-delay=1,outer_lr=0.5", "1-delay=3,outer_lr=0.5", "2-delay=1,outer_lr=0.7",
                     "3-delay=3,outer_lr=0.7"]
    # Each job trained into its own directory, with the fixed overrides applied.
    assert [(c.outer_lr, c.delay, c.rounds) for c in fake_training] == [(0.5, 1, 2), (0.7, 1, 2)]
    assert [c.out_dir for c in fake_training] == [str(sweep / names[0]), str(sweep / names[2])]
    assert (sweep / names[2] / "summary.json").exists()
    failure = json.loads((sweep / names[3] / FAILED_NAME).read_text())
    assert "delay must be 1 or 2" in failure["error"] and failure["config"]["delay"] == 3
    assert "RuntimeError: the worker of partition 1 died" in index["jobs"][0]["error"]
    assert "Traceback" in json.loads((sweep / names[0] / FAILED_NAME).read_text())["traceback"]
    out = capsys.readouterr().out
    assert f"sweep {sweep}: 4 jobs, 1 completed, 3 failed" in out
    assert "#2   completed" in out and f"report: fl-diloco report {sweep}" in out
    # The report reads the sweep where it lies now.
    moved = tmp_path / "moved"
    shutil.move(sweep, moved)
    assert report_main([str(moved)]) == 0
    text = (moved / "report.md").read_text()
    assert "| eager d=1 (baseline) | 0 | 7.0000 |" in text and "| 3-delay=3,outer_lr=0.7 | failed |" in text


def test_a_sweep_where_every_job_works_exits_zero(tmp_path, fake_training, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--multirun", "algorithm=diloco,eager-d2"]) == 0
    [sweep] = (tmp_path / "runs").glob("sweep-*")  # the default: ./runs/sweep-<timestamp>
    assert [(c.algorithm, c.delay) for c in fake_training] == [("diloco", 1), ("eager", 2)]
    # out_dir is absolute (the ServerApp needs it so), inside the sweep.
    assert [c.out_dir for c in fake_training] == [str(sweep / "0-algorithm=diloco"),
                                                  str(sweep / "1-algorithm=eager-d2")]
    index = json.loads((sweep / SWEEP_INDEX_NAME).read_text())
    assert index["command"].startswith("fl-diloco train --multirun algorithm=diloco,eager-d2")
    assert [job["overrides"] for job in index["jobs"]] == [["algorithm=diloco"], ["algorithm=eager-d2"]]


def test_an_interrupted_sweep_stops_and_says_where(tmp_path, monkeypatch):
    def interrupted_on_eager(cfg: RunConfig) -> dict:
        if cfg.algorithm == "eager":
            raise KeyboardInterrupt  # Ctrl-C; Ray turns SIGTERM into SystemExit, handled alike
        return fake_run(Path(cfg.out_dir), cfg, [8.0, 7.0])

    monkeypatch.setattr(cli, "run_job", interrupted_on_eager)
    sweep = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "-m", "algorithm=diloco,eager,delayed", f"hydra.sweep.dir={sweep}"])
    index = json.loads((sweep / SWEEP_INDEX_NAME).read_text())
    assert [job["status"] for job in index["jobs"]] == ["completed", "interrupted"]  # delayed never ran


def test_a_single_run_writes_no_sweep(tmp_path, fake_training, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "algorithm=eager", "delay=2", f"out_dir={tmp_path / 'run'}"]) == 0
    assert [(c.algorithm, c.delay, c.out_dir) for c in fake_training] == [("eager", 2, str(tmp_path / "run"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overrides_are_checked_before_hydra_starts():
    cli.check_overrides(["-m", "algorithm=diloco,eager", "model=35m", "wire=fp4", "hardware=cpu",
                         "data=shakespeare", "inner_steps=30,100", "seed=range(0,3)", "hydra.sweep.dir=/x"])
    with pytest.raises(cli.ConfigError, match="algorithm=eagr is not an option of the 'algorithm' group. "
                                              "Did you mean 'eager'?"):
        cli.check_overrides(["-m", "algorithm=diloco,eagr"])
    with pytest.raises(cli.ConfigError, match="Did you mean 'wire'"):
        cli.check_overrides(["wirre=fp4"])
    with pytest.raises(cli.ConfigError, match="Did you mean 'inner_steps'"):
        cli.check_overrides(["-m", "inner_step=30,100"])


def test_jobs_of_a_sweep_may_not_share_an_out_dir(tmp_path, fake_training):
    sweep, shared = tmp_path / "sweep", tmp_path / "shared"
    assert cli.main(["train", "-m", "algorithm=diloco,eager", f"out_dir={shared}",
                     f"hydra.sweep.dir={sweep}"]) == 1
    index = json.loads((sweep / SWEEP_INDEX_NAME).read_text())
    assert [(job["status"], job["out_dir"]) for job in index["jobs"]] == [("completed", str(shared)),
                                                                          ("failed", str(shared))]
    assert "overwrite its results" in index["jobs"][1]["error"]
    assert len(fake_training) == 1


def test_a_four_job_sweep_of_real_simulations_and_its_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = cli.main(["train", "-m", "algorithm=diloco,eager", "seed=0,1", *tiny_overrides(tmp_path),
                     f"hydra.sweep.dir={sweep}"])
    assert code == 0
    index = json.loads((sweep / SWEEP_INDEX_NAME).read_text())
    assert [job["status"] for job in index["jobs"]] == ["completed"] * 4
    for job in index["jobs"]:
        out_dir = sweep / job["job_dir"]
        for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint"):
            assert (out_dir / name).exists(), f"{out_dir} lacks {name}"
    capsys.readouterr()
    assert report_main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| diloco", "| eager"))]
    assert len(rows) == 2 and all("0, 1 (n=2)" in row and " ± " in row for row in rows)
    assert rows[0].startswith("| diloco (baseline)") and "| 1.0000 |" in rows[0]
    assert (sweep / "eval_loss_vs_tokens.png").exists()
    assert not (sweep / "eval_loss_vs_H.png").exists()  # H was not swept
    assert "eval_loss_vs_tokens" in capsys.readouterr().out
