"""The runtime folder and the worker processes in it: no other local user can redirect where a
node writes, and workers of a run nobody drives any more leave when a new run starts."""

import os
import stat
import subprocess
import sys
import time

import pytest

from clients.channel import KEY_NAME, LOG_NAME, WorkerError, WorkerHandle, runtime_root
from tests.test_worker import _wait_gone

SPARE_UID = 65534  # "nobody" on most systems: a uid that is not ours


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    path = tmp_path / "runtime"
    monkeypatch.setenv("FL_DILOCO_RUNTIME_DIR", str(path))
    return path


def test_a_planted_symlink_is_refused_and_its_target_left_alone(runtime_dir, tmp_path):
    # Another user plants `ln -s <a directory of root's> $TMPDIR/fl-diloco-0`: root must
    # neither change that directory's mode nor write a key into it.
    target = tmp_path / "someone-elses-dir"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    runtime_dir.symlink_to(target)
    if os.getuid() == 0:
        os.lchown(runtime_dir, SPARE_UID, SPARE_UID)
    with pytest.raises(WorkerError, match="symbolic link.*refusing to use it.*FL_DILOCO_RUNTIME_DIR"):
        WorkerHandle(run_id=1, node_id=1)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert list(target.iterdir()) == []


def test_a_planted_symlink_inside_the_root_is_refused_too(runtime_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    runtime_root()
    (runtime_dir / "run1-node1").symlink_to(target)
    with pytest.raises(WorkerError, match="symbolic link"):
        WorkerHandle(run_id=1, node_id=1)
    assert not (target / KEY_NAME).exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another uid")
def test_a_folder_of_another_user_is_refused_naming_its_owner(runtime_dir):
    runtime_dir.mkdir(mode=0o700)
    os.chown(runtime_dir, SPARE_UID, SPARE_UID)
    with pytest.raises(WorkerError, match=f"belongs to .*uid {SPARE_UID}.*FL_DILOCO_RUNTIME_DIR"):
        WorkerHandle(run_id=1, node_id=1)
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700 and list(runtime_dir.iterdir()) == []


def test_a_folder_others_can_write_into_is_refused_and_a_readable_one_tightened(runtime_dir):
    runtime_dir.mkdir()
    runtime_dir.chmod(0o777)
    with pytest.raises(WorkerError, match="writable by other users"):
        WorkerHandle(run_id=1, node_id=1)
    runtime_dir.chmod(0o755)
    handle = WorkerHandle(run_id=1, node_id=1)
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(handle.directory.stat().st_mode) == 0o700


@pytest.fixture
def node_process():
    """Stands for a SuperNode that stays up while its runs come and go."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_worker_of_a_killed_run_leaves_once_a_new_run_starts(runtime_dir, node_process):
    # Run 1's server was killed: its worker gets no more requests, but its node lives on and
    # its idle timeout is long. Run 2 starting a worker on the machine must end it.
    old = WorkerHandle(run_id=1, node_id=7)
    old.ensure_running(watch_pid=node_process, idle_timeout=600, yield_after=1.0)
    old_pid = old.call({"kind": "ping"}, timeout=10)["pid"]
    WorkerHandle(run_id=2, node_id=8).ensure_running(watch_pid=node_process, idle_timeout=600,
                                                     yield_after=1.0)
    assert _wait_gone(old_pid, seconds=20), "the killed run's worker outlived the new run's start"
    assert "another run started on this machine" in (old.directory / LOG_NAME).read_text()


def test_a_worker_whose_run_is_still_driven_stays(runtime_dir, node_process):
    live = WorkerHandle(run_id=1, node_id=7)
    live.ensure_running(watch_pid=node_process, idle_timeout=600, yield_after=300)
    WorkerHandle(run_id=2, node_id=8).ensure_running(watch_pid=node_process, idle_timeout=600)
    time.sleep(2)  # the old worker's watchdog has looked (once a second) and kept it
    assert live.is_running()
    live.call({"kind": "shutdown"}, timeout=10)


# ----- the message format: arrays out of band -----

def _round_trip(message, framed: list[int] | None = None):
    """`message` through a socket pair; `framed` collects the sizes of the pickled frames."""
    import threading
    from multiprocessing.connection import Pipe

    from clients.channel import recv_message, send_message

    sender, receiver = Pipe()
    if framed is not None:
        send_bytes = sender.send_bytes
        sender.send_bytes = lambda buf: (framed.append(len(buf)), send_bytes(buf))
    with sender, receiver:
        thread = threading.Thread(target=send_message, args=(sender, message))
        thread.start()  # a payload larger than the socket's buffer needs a reader at once
        received = recv_message(receiver)
        thread.join()
    return received


def test_a_message_arrives_whole_and_its_arrays_are_writable_copies():
    import numpy as np

    big = np.arange(600_000, dtype=np.float32).reshape(600, 1000)  # beyond a socket buffer
    read_only = np.frombuffer(np.arange(7, dtype=np.uint16).tobytes(), dtype=np.uint16)
    message = {"kind": "train", "round": 3, "aggregate": {"w": big, "codes": read_only},
               "strided": big[:, ::2], "scalar": np.float32(0.5), "zero_d": np.array(2.0), "empty": np.zeros((0, 4)),
               "rows": [np.ones(3, np.int64)], "metrics": {"tokens": 10}}
    framed = []
    received = _round_trip(message, framed)
    assert received.keys() == message.keys()
    # The contiguous arrays (2.4 MB) never enter the pickle; only the strided one (1.2 MB) does.
    assert framed and sum(framed) < big[:, ::2].nbytes + 4096
    for path, sent, got in [("w", big, received["aggregate"]["w"]), ("codes", read_only, received["aggregate"]["codes"]),
                            ("strided", big[:, ::2], received["strided"]), ("zero_d", message["zero_d"], received["zero_d"]),
                            ("empty", message["empty"], received["empty"]), ("rows", message["rows"][0], received["rows"][0])]:
        assert got.dtype == sent.dtype and got.shape == sent.shape and np.array_equal(got, sent), path
        # The worker may use what it receives in place: every array it gets is its own and writable,
        # a sender's read-only view (the adapter's view of a Flower record) included.
        assert got.flags.writeable and not np.shares_memory(got, sent), path
    assert received["scalar"] == np.float32(0.5) and received["metrics"] == {"tokens": 10}


def test_a_channel_that_closes_mid_message_is_an_eof_not_a_short_array():
    import pickle
    from multiprocessing.connection import Pipe

    from clients.channel import recv_message

    sender, receiver = Pipe()
    with receiver:
        with sender:
            sender.send_bytes(pickle.dumps(([1000], pickle.dumps({"kind": "train"}))))
            os.write(sender.fileno(), bytes(10))  # 10 of the 1000 bytes announced
        with pytest.raises(EOFError):
            recv_message(receiver)
