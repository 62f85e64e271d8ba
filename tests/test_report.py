"""`fl-diloco report`: rows of runs that differ only by seed, mean ± std, the baseline ratio,
failed jobs, and the plots, on synthetic sweep directories (no training)."""

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fl_diloco.config import RunConfig
from fl_diloco.report import (
    FAILED_NAME,
    SWEEP_INDEX_NAME,
    ReportError,
    choose_baseline,
    group_rows,
    load_jobs,
    loss_vs_inner_steps,
    main,
    parse_selector,
    report,
)
from fl_diloco.reporting import peak_round_bytes


def fake_run(out_dir: Path, cfg: RunConfig, losses: list[float], wall: float = 10.0,
             compute: float = 8.0, idle: float = 2.0) -> dict:
    """Write what a finished run leaves (config.json, metrics.jsonl, summary.json), with eval
    losses `losses` at rounds 0, 1, ..., and return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_per_round = cfg.num_clients * cfg.inner_steps * cfg.batch_size * cfg.seq_len
    records = [{"round": r, "tokens_total": r * tokens_per_round, "eval_loss": loss, "train_loss": loss}
               for r, loss in enumerate(losses)]
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"algorithm": cfg.algorithm, "variant": cfg.variant_label, "tokens": records[-1]["tokens_total"],
               "first_eval_loss": losses[0], "final_eval_loss": losses[-1], "wall_seconds": wall,
               "compute_seconds": compute, "idle_seconds": idle,
               "compute_utilization": compute / (compute + idle),
               "bytes_up": 1_000_000 * len(losses), "bytes_down": 2_000_000 * len(losses),
               "eval_history": [{"round": r["round"], "tokens": r["tokens_total"], "eval_loss": r["eval_loss"]}
                                for r in records],
               "config": cfg.to_dict()}
    (out_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def make_sweep(root: Path) -> Path:
    """diloco and eager at seeds 0 and 1, plus an eager job that failed; with a sweep.json."""
    sweep = root / "sweep"
    runs = [("diloco", 0, [8.0, 6.0, 5.0]), ("diloco", 1, [8.0, 6.2, 5.2]),
            ("eager", 0, [8.0, 6.5, 5.5]), ("eager", 1, [8.0, 6.9, 5.9])]
    jobs = []
    for num, (algorithm, seed, losses) in enumerate(runs):
        job_dir = sweep / f"{num}-algorithm={algorithm},seed={seed}"
        cfg = RunConfig.from_mapping({"algorithm": algorithm, "seed": seed, "inner_steps": 4,
                                      "out_dir": str(job_dir)})
        fake_run(job_dir, cfg, losses, wall=10.0 + seed)
        jobs.append({"num": num, "overrides": [f"algorithm={algorithm}", f"seed={seed}"],
                     "job_dir": job_dir.name, "out_dir": job_dir.name, "status": "completed"})
    failed_dir = sweep / "4-algorithm=eager,seed=2"
    failed_dir.mkdir()
    (failed_dir / FAILED_NAME).write_text(json.dumps({
        "error": "RuntimeError: worker 1 died", "traceback": "...", "overrides": ["algorithm=eager", "seed=2"],
        "config": {"algorithm": "eager", "seed": 2}}))
    jobs.append({"num": 4, "overrides": ["algorithm=eager", "seed=2"], "job_dir": failed_dir.name,
                 "out_dir": failed_dir.name, "status": "failed", "error": "RuntimeError: worker 1 died"})
    (sweep / SWEEP_INDEX_NAME).write_text(json.dumps({"jobs": jobs}))
    return sweep


def test_runs_that_differ_only_by_seed_share_a_row_with_mean_and_std(tmp_path):
    jobs = load_jobs(make_sweep(tmp_path))
    assert [job.status for job in jobs] == ["completed"] * 4 + ["failed"]
    rows = group_rows(jobs)
    assert [row.label for row in rows] == ["diloco", "eager d=1"]
    diloco, eager = rows
    assert diloco.seeds == [0, 1] and eager.seeds == [0, 1]
    loss = eager.stat("final_eval_loss")
    assert loss.n == 2
    assert loss.mean == pytest.approx(5.7)
    assert loss.std == pytest.approx(statistics.stdev([5.5, 5.9]))
    assert diloco.stat("wall_seconds").mean == pytest.approx(10.5)


def test_report_table_shows_mean_std_ratio_and_failed_jobs(tmp_path):
    sweep = make_sweep(tmp_path)
    paths = report(sweep)
    text = paths["report"].read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    diloco, eager = lines["diloco (baseline)"], lines["eager d=1"]
    std = statistics.stdev([5.0, 5.2])
    assert f"5.1000 ± {std:.4f}" in diloco and "(n=2)" in diloco
    assert "| 1.0000 |" in diloco
    assert f"| {5.7 / 5.1:.4f} |" in eager  # ratio of the means
    assert "3.0MB" in eager and "6.0MB" in eager  # bytes up / down, mean over seeds
    assert "0.800" in eager  # CU = 8 / (8 + 2)
    assert "| 4-algorithm=eager,seed=2 | failed |" in text and "worker 1 died" in text
    assert "5 jobs: 4 completed in 2 rows, 1 failed" in text
    assert "Every run: `model=tiny num_clients=4 inner_steps=4 rounds=20`." in text  # what they share
    assert paths["eval_loss_vs_tokens"].exists() and paths["eval_loss_vs_tokens"].stat().st_size > 1000
    # H was not swept: a plot of one dot per variant would say nothing.
    assert "eval_loss_vs_H" not in paths and not (sweep / "eval_loss_vs_H.png").exists()


def test_baseline_can_be_chosen_and_a_missing_one_is_named(tmp_path):
    rows = group_rows(load_jobs(make_sweep(tmp_path)))
    row, how = choose_baseline(rows, parse_selector("algorithm=eager,delay=1"))
    assert row.label == "eager d=1" and "algorithm=eager,delay=1" in how
    text = report(make_sweep(tmp_path / "again"), baseline="algorithm=eager")["report"].read_text()
    assert "| eager d=1 (baseline) |" in text and f"| {5.1 / 5.7:.4f} |" in text
    with pytest.raises(ReportError, match="no row matches --baseline algorithm=dp; rows: diloco; eager d=1"):
        choose_baseline(rows, parse_selector("algorithm=dp"))
    with pytest.raises(ReportError, match="KEY=VALUE"):
        parse_selector("diloco")


def test_keys_that_vary_besides_the_variant_are_in_the_label_and_h_lines(tmp_path):
    # No sweep.json: job directories are found by what they hold.
    sweep = tmp_path / "sweep"
    for num, (algorithm, h, loss) in enumerate([("diloco", 4, 5.0), ("diloco", 8, 4.8), ("eager", 4, 5.5),
                                                 ("eager", 8, 5.2)]):
        cfg = RunConfig.from_mapping({"algorithm": algorithm, "inner_steps": h})
        fake_run(sweep / f"{num}-x", cfg, [8.0, loss])
    rows = group_rows(load_jobs(sweep))
    assert [row.label for row in rows] == ["diloco, inner_steps=4", "diloco, inner_steps=8",
                                           "eager d=1, inner_steps=4", "eager d=1, inner_steps=8"]
    assert all(len(row.runs) == 1 and row.stat("final_eval_loss").std is None for row in rows)
    paths = report(sweep, out_dir=tmp_path / "out")
    table = [line for line in paths["report"].read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4 and not any("±" in line for line in table)  # one seed: no spread
    assert (tmp_path / "out" / "eval_loss_vs_H.png").exists()


@pytest.mark.parametrize("runs, lines", [
    # every run makes 80 inner steps: rounds follows H, and each variant is one line over H
    ([("diloco", 4, 20), ("diloco", 8, 10), ("eager", 4, 20), ("eager", 8, 10)],
     {"diloco": [4, 8], "eager d=1": [4, 8]}),
    # rounds varies on its own: it stays part of the variant
    ([("diloco", 4, 20), ("diloco", 8, 10), ("eager", 4, 20), ("eager", 8, 20)],
     {"diloco, rounds=20": [4], "diloco, rounds=10": [8], "eager d=1, rounds=20": [4, 8]}),
])
def test_an_h_sweep_at_a_fixed_budget_draws_one_line_per_variant(tmp_path, runs, lines):
    for num, (algorithm, h, rounds) in enumerate(runs):
        cfg = RunConfig.from_mapping({"algorithm": algorithm, "inner_steps": h, "rounds": rounds})
        fake_run(tmp_path / "sweep" / f"{num}-x", cfg, [8.0, 5.0])
    found = loss_vs_inner_steps(group_rows(load_jobs(tmp_path / "sweep")))
    assert {name: [h for h, _ in points] for name, points in found.items()} == lines


def test_a_directory_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(ReportError, match="no runs in"):
        load_jobs(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs in" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_a_sweep_where_every_job_failed_still_reports_why(tmp_path):
    job = tmp_path / "sweep" / "0-delay=3"
    job.mkdir(parents=True)
    (job / FAILED_NAME).write_text(json.dumps({"error": "ConfigError: delay must be 1 or 2",
                                               "overrides": ["delay=3"]}))
    text = report(tmp_path / "sweep")["report"].read_text()
    assert "0 completed" in text and "delay must be 1 or 2" in text


def test_a_single_run_is_reported_as_one_row(tmp_path, capsys):
    run = tmp_path / "run"
    fake_run(run, RunConfig.from_mapping({"algorithm": "eager"}), [8.0, 6.0, 5.5])
    (run / "checkpoint").mkdir()  # what every run also holds: not a job of a sweep
    (run / "checkpoint" / "config.json").write_text("{}")
    assert main([str(run)]) == 0
    text = (run / "report.md").read_text()
    assert text.startswith("# Run report: run") and "1 jobs: 1 completed in 1 rows" in text
    assert "| eager d=1 (baseline) |" in text and "checkpoint" not in text
    assert not (run / "eval_loss_vs_H.png").exists()


def _sweep_with_a_running_job(root, pid):
    sweep = root / "sweep"
    (sweep / "0-seed=0").mkdir(parents=True)
    index = {"pid": pid, "host": socket.gethostname(),
             "jobs": [{"num": 0, "overrides": ["seed=0"], "job_dir": "0-seed=0", "out_dir": "0-seed=0",
                       "status": "running"}]}
    (sweep / SWEEP_INDEX_NAME).write_text(json.dumps(index))
    return sweep


def test_a_job_left_running_by_a_killed_sweep_is_marked_interrupted(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a pid whose process is gone, as a SIGKILLed sweep's
    sweep = _sweep_with_a_running_job(tmp_path, ended.pid)
    [job] = load_jobs(sweep)
    assert job.status == "interrupted" and "run it again" in job.error
    assert json.loads((sweep / SWEEP_INDEX_NAME).read_text())["jobs"][0]["status"] == "interrupted"
    assert "0 completed in 0 rows, 0 failed, 1 interrupted" in report(sweep)["report"].read_text()


def test_a_job_of_a_live_sweep_stays_running(tmp_path):
    sweep = _sweep_with_a_running_job(tmp_path, os.getpid())
    [job] = load_jobs(sweep)
    assert job.status == "incomplete"
    assert json.loads((sweep / SWEEP_INDEX_NAME).read_text())["jobs"][0]["status"] == "running"


def test_peak_round_bytes_compares_a_round_with_a_full_outer_step():
    # P = 2: rounds 1+2 and 3+4 are two outer steps; the full sync is the larger sum.
    records = [{"round": 0}] + [{"round": r, "bytes_up": b} for r, b in zip(range(1, 6), (50, 52, 49, 51, 50))]
    assert peak_round_bytes(records, 2) == {"peak_round_bytes_up": 52, "full_sync_bytes_up": 102,
                                            "peak_round_share": 52 / 102}
    assert peak_round_bytes(records, 1)["peak_round_share"] == 1.0  # DiLoCo: every round is a full sync
    assert peak_round_bytes([{"round": 1, "train_loss": 3.0}], 1) == {}  # no bytes recorded (dp)
