"""Worker start-up (issue 13): it has its own timeout, separate from round_timeout, and when it
expires the run names the nodes that did not start and quotes their worker logs."""

import threading
from types import SimpleNamespace

import pytest
from clients.channel import LOG_NAME, worker_dir
from fl_diloco.client_app import PREPARE_ACTION
from fl_diloco.server_app import run_server
from tests.conftest import small_config
from tests.fake_grid import FakeGrid


class SlowStartGrid(FakeGrid):
    """Nodes whose first prepare takes `delay` seconds, or never answers (delay=None)."""

    def __init__(self, num_nodes: int, slow: dict[int, float | None]) -> None:
        super().__init__(num_nodes)
        self.run = SimpleNamespace(run_id=4711)
        self.slow = slow
        self.released = threading.Event()  # ends the silent nodes' waits when the test is over

    def _serve(self, message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type.endswith(PREPARE_ACTION) and node in self.slow:
            delay = self.slow.pop(node)  # only the first prepare is slow
            self.released.wait(delay)
            if delay is None:
                return  # silent: no reply at all
        super()._serve(message)


def test_start_up_slower_than_a_round_timeout_is_not_a_failure(tmp_path):
    # Start-up took longer than a round may; before startup_timeout existed the first prepare
    # waited only round_timeout and the run died although the workers were alive.
    grid = SlowStartGrid(2, slow={101: 3.0})
    cfg = small_config(tmp_path, rounds=1, round_timeout=1.0, startup_timeout=60.0)
    try:
        run_server(grid, cfg)
    finally:
        grid.stop_all()
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_node_that_does_not_start_is_named_with_its_worker_log(tmp_path):
    grid = SlowStartGrid(2, slow={101: None})
    log = worker_dir(4711, 101) / LOG_NAME
    log.write_text("worker 123 serving ...\nloading the corpus: 9 GiB of parquet\n")
    cfg = small_config(tmp_path, startup_timeout=1.0)
    try:
        with pytest.raises(RuntimeError) as failure:
            run_server(grid, cfg)
    finally:
        grid.released.set()
        grid.stop_all()
    message = str(failure.value)
    assert "nodes [101]" in message and "startup_timeout=1s" in message
    assert "loading the corpus: 9 GiB of parquet" in message
    assert "node 100" not in message  # the node that started is not blamed
    # The worker that did start was told to stop, not left waiting for rounds.
    assert grid.workers[100]._stopping


def test_a_node_elsewhere_is_named_with_where_its_log_is(tmp_path):
    grid = SlowStartGrid(2, slow={100: None, 101: None})
    cfg = small_config(tmp_path, startup_timeout=0.5)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)nodes \[100, 101\].*node 100: its worker log is on "
                                               r"that node, at \$FL_DILOCO_RUNTIME_DIR/run4711-node100/"):
            run_server(grid, cfg)
    finally:
        grid.released.set()
        grid.stop_all()
