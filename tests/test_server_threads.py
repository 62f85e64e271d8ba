"""The server's evaluation does not fight the workers for cores (issue 13): it runs with
`server_threads` torch threads, by default the cores the co-located workers leave free, and
every evaluated round reports the seconds its evaluation took."""

import json

import pytest
import torch

import fl_diloco.server_app as server_app
from fl_diloco.server_app import run_server, server_threads
from tests.conftest import small_config
from tests.fake_grid import FakeGrid


@pytest.mark.parametrize(("cores", "overrides", "expected"), [
    (16, dict(num_clients=4, threads_per_worker=0), 1),  # the workers take 4 x 4 cores
    (16, dict(num_clients=3, threads_per_worker=0), 1),  # 3 x 5: one core left
    (16, dict(num_clients=4, threads_per_worker=2), 8),  # 4 x 2: eight left
    (2, dict(num_clients=4, threads_per_worker=1), 1),   # oversubscribed already: never below 1
    (16, dict(num_clients=4, threads_per_worker=0, server_threads=6), 6),  # set: taken as it is
])
def test_the_servers_threads_follow_the_key_or_the_cores_the_workers_leave(tmp_path, monkeypatch, cores,
                                                                          overrides, expected):
    monkeypatch.setattr(server_app.os, "cpu_count", lambda: cores)
    assert server_threads(small_config(tmp_path, **overrides)) == expected


def test_the_server_evaluates_with_its_threads_and_reports_the_seconds(tmp_path, monkeypatch):
    threads_seen = []
    evaluate = server_app.evaluate

    def recording_evaluate(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(server_app, "evaluate", recording_evaluate)
    before = torch.get_num_threads()
    cfg = small_config(tmp_path, rounds=3, eval_every=2, server_threads=before + 1, checkpoint_every=0)
    grid = FakeGrid(2)
    try:
        summary = run_server(grid, cfg)
    finally:
        grid.stop_all()
    assert threads_seen == [before + 1] * 3  # rounds 0, 2 and 3 (the last)
    assert torch.get_num_threads() == before  # restored for whoever runs next in this process
    assert summary["server_threads"] == before + 1

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        evaluated = record["eval_loss"] is not None
        assert (record["eval_seconds"] is not None) == evaluated, record["round"]
        if evaluated:
            assert record["eval_seconds"] > 0
    assert [r["round"] for r in records if r["eval_seconds"] is not None] == [0, 2, 3]
    assert summary["eval_seconds"] == pytest.approx(sum(r["eval_seconds"] or 0 for r in records))
