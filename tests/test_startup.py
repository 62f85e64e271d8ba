"""Worker start-up (issue 13): it has its own timeout, separate from round_timeout, and when it
expires the run names the nodes that did not start and quotes their worker logs; a run that
cannot fit in the machine's memory is refused with the numbers before anything starts."""

import threading
from types import SimpleNamespace

import pytest
from clients.channel import LOG_NAME, worker_dir
from clients.worker import Worker
from fl_diloco import memory
from fl_diloco.client_app import PREPARE_ACTION
from fl_diloco.config import ConfigError, RunConfig
from fl_diloco.memory import check_memory
from fl_diloco.model import model_config
from fl_diloco.preflight import check_before_start
from fl_diloco.server_app import run_server
from tests.conftest import load_bench, small_config
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


# ----- the memory check before start-up -----

GIB = memory.GIB


def _machine_with(monkeypatch, gib):
    monkeypatch.setattr(memory, "available_host_memory", lambda: (gib * GIB, "a test machine"))


def test_a_run_that_cannot_fit_is_refused_with_the_numbers(monkeypatch):
    # model=1b under a 4 GiB limit was OOM-killed 35 s in, with no message.
    _machine_with(monkeypatch, 4)
    cfg = RunConfig(model="1b", device="cpu")
    with pytest.raises(ConfigError, match=r"model=1b needs ~\d+\.\d GiB of memory per worker × 4 workers "
                                          r"\+ \d+\.\d GiB for the server = \d+\.\d GiB; this machine has "
                                          r"4\.0 GiB available \(a test machine\); lower num_clients"):
        check_before_start(cfg, workers_here=4)
    # A node far from the server checks its own worker alone, and says so in its reply.
    answer = Worker().handle({"kind": "prepare", "run_config": cfg.to_dict(), "partition_id": 0,
                              "num_partitions": 4, "device": "cpu", "params": {}})
    assert "model=1b needs" in answer["error"] and "× 1 workers =" in answer["error"]


def test_the_quickstart_and_the_test_runs_are_never_refused(monkeypatch, tmp_path):
    _machine_with(monkeypatch, 1)  # `fl-diloco train` as the README starts it, on a 1 GiB machine
    check_memory(RunConfig(device="cpu"), workers_here=RunConfig().num_clients)
    check_memory(small_config(tmp_path), workers_here=2)


def test_the_estimate_covers_what_autograd_keeps():
    # The activation constants bound what bench/worker_memory.py measures (bf16 autocast).
    bench = load_bench("worker_memory")
    model = model_config("tiny-1m", seq_len=bench.PROBE_TOKENS)
    profile = bench.activation_profile("tiny-1m")
    assert profile["block_token"] <= memory.ACTIVATION_BYTES_PER_BLOCK_TOKEN["bf16"] * model.d_model
    assert profile["outside_token"] <= memory.ACTIVATION_BYTES_OUTSIDE_BLOCKS * model.vocab_size


def test_a_containers_memory_limit_counts(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 67108864 kB\nMemAvailable: 60000000 kB\n")
    (proc / "self" / "cgroup").write_text("0::/job\n")
    (cgroup / "job").mkdir(parents=True)
    (cgroup / "job" / "memory.max").write_text(f"{4 * GIB}\n")
    (cgroup / "job" / "memory.current").write_text(f"{2 * GIB}\n")
    (cgroup / "job" / "memory.stat").write_text(f"anon 1\ninactive_file {GIB // 2}\n")
    available, source = memory.available_host_memory(proc, cgroup)
    assert available == 2.5 * GIB and "memory.max" in source
    (cgroup / "job" / "memory.max").write_text("max\n")
    assert memory.available_host_memory(proc, cgroup) == (60000000 * 1024, "MemAvailable in /proc/meminfo")
