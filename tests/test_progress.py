"""Progress within a round: workers publish their inner step, a terminal's bar follows the slowest."""

import io
import time

from tqdm import tqdm

from clients.progress import PROGRESS_NAME, ProgressPublisher, slowest_step
from clients.worker import optimizer_state_dir
from fl_diloco import reporting
from tests.conftest import small_config
from tests.in_process import run_in_process


def test_the_slowest_published_step_and_none_until_every_worker_published(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    first = ProgressPublisher(folders[0], interval=0.0)
    assert slowest_step(folders) is None
    first.publish(7)
    assert slowest_step(folders) is None  # b has not published: its step is unknown
    ProgressPublisher(folders[1], interval=0.0).publish(5)
    assert slowest_step(folders) == 5
    first.publish(9)
    assert slowest_step(folders) == 5


def test_a_publisher_writes_at_most_once_per_interval_and_never_fails(tmp_path):
    publisher = ProgressPublisher(tmp_path / "w", interval=3600.0)
    publisher.publish(1)
    publisher.publish(2)  # within the interval: not written
    assert (tmp_path / "w" / PROGRESS_NAME).read_text() == "1"
    (tmp_path / "w" / PROGRESS_NAME).unlink()
    (tmp_path / "w").rmdir()  # the node removed its state at shutdown
    publisher.last_written = -float("inf")
    publisher.publish(3)
    assert not (tmp_path / "w").exists()


def test_in_process_workers_publish_their_inner_step(tmp_path):
    cfg = small_config(tmp_path, rounds=2, eval_every=100)
    run_in_process(cfg)
    step = slowest_step(optimizer_state_dir(cfg, p) for p in range(cfg.num_clients))
    assert step is not None and 1 <= step <= cfg.total_inner_steps


def test_a_terminal_bar_moves_within_a_round(tmp_path, monkeypatch):
    bars = []

    def bar(total, initial, unit):
        bars.append(tqdm(total=total, initial=initial, file=io.StringIO(), unit=unit))
        return bars[-1]
    monkeypatch.setattr(reporting, "round_progress_bar", bar)
    published = {"step": None}
    run_log = reporting.RunLog(tmp_path, total_rounds=4, steps_per_round=10,
                               step_source=lambda: published["step"])
    try:
        assert bars[0].total == 40 and bars[0].n == 0
        published["step"] = 13  # round 2 is under way: the slowest worker is at inner step 13
        deadline = time.monotonic() + 30
        while bars[0].n != 13 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bars[0].n == 13
        run_log.log({"round": 2})  # a closed round moves it to 20 at least...
        assert bars[0].n == 20
        published["step"] = 15  # ...and a stale file never moves it back
        time.sleep(1.5)
        assert bars[0].n == 20
    finally:
        run_log.close()
