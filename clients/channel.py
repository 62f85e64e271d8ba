"""The private channel between a node's ClientApp adapter and its persistent worker process.

In deployment every Flower message runs in a fresh ClientApp process
(docs/algorithms.md#flower-constraints), so the model, its optimizer state and its data
stream live in a long-lived worker process instead, one per (run, node). The adapter finds that process through a Unix socket and talks to it
with `multiprocessing.connection`, which authenticates both ends with an HMAC challenge
before any pickle is read. Two locks keep other local users out:

- the socket lives in a directory only its owner can enter (0700), checked on every use
  without following symbolic links (the temp folder it sits in is shared by every user);
- the shared key is in a 0600 file inside it, so even a user who could reach the socket
  cannot pass the challenge, drive the worker or read its tensors.

Requests and replies carry whole models, so their arrays cross out of band (`send_message`):
written to the socket from where they lie and read into a buffer of their own on the other
side, never copied into or out of a pickle.
"""

from __future__ import annotations

import fcntl
import io
import os
import pickle
import pwd
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import numpy as np

from fl_diloco import round_events

SOCKET_NAME = "worker.sock"
KEY_NAME = "authkey"
LOG_NAME = "worker.log"
PID_NAME = "worker.pid"
# A request from a node's adapter to the workers of other runs: "a new run is starting here".
ANOTHER_RUN = "another_run"
LOG_TAIL_BYTES = 16384  # enough for the last lines of a log, even with a traceback


class WorkerError(RuntimeError):
    """The worker process failed, could not be started, or did not answer in time."""


def _array_from(buffer: memoryview | bytearray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    # A read-only view of our own receive buffer (a sender's read-only array): the array gets
    # the buffer itself, so it is writable like any other the receiver builds.
    return np.frombuffer(buffer.obj if isinstance(buffer, memoryview) else buffer, dtype=dtype).reshape(shape)


class _OutOfBandPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject and obj.flags.c_contiguous:
            return _array_from, (pickle.PickleBuffer(obj), obj.dtype.str, obj.shape)
        return NotImplemented


def send_message(conn: Connection, message: Any) -> None:
    """Send `message`; its contiguous numpy arrays go out of band, straight from their memory."""
    head, buffers = io.BytesIO(), []
    _OutOfBandPickler(head, protocol=5, buffer_callback=buffers.append).dump(message)
    raw = [buffer.raw() for buffer in buffers]
    conn.send_bytes(pickle.dumps(([len(r) for r in raw], head.getvalue())))
    for view in raw:
        while view:
            view = view[os.write(conn.fileno(), view):]


def recv_message(conn: Connection) -> Any:
    """Receive what `send_message` sent; each array is read into a buffer of its own."""
    sizes, head = pickle.loads(conn.recv_bytes())
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        while view:
            if not (got := os.readv(conn.fileno(), [view])):
                raise EOFError("the channel closed in the middle of a message")
            view = view[got:]
        buffers.append(buffer)
    return pickle.loads(head, buffers=buffers)


RUNTIME_DIR_ENV = "FL_DILOCO_RUNTIME_DIR"


def runtime_root_path() -> Path:
    """Where worker directories live: $FL_DILOCO_RUNTIME_DIR, else `fl-diloco-<uid>` in the temp
    folder. Nothing is created or checked here (see `runtime_root`)."""
    return Path(os.environ.get(RUNTIME_DIR_ENV)
                or os.path.join(tempfile.gettempdir(), f"fl-diloco-{os.getuid()}"))


def runtime_root() -> Path:
    """The runtime root, created private (0700) or verified to be ours and private."""
    path = runtime_root_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _private_dir(path)


def run_prefix(run_id: int) -> str:
    return f"run{run_id}-"


def worker_dir_name(run_id: int, node_id: int) -> str:
    return f"{run_prefix(run_id)}node{node_id}"


def worker_dir(run_id: int, node_id: int) -> Path:
    return _private_dir(runtime_root() / worker_dir_name(run_id, node_id))


def _owner(uid: int) -> str:
    try:
        return f"user '{pwd.getpwuid(uid).pw_name}' (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: Path, what: str) -> WorkerError:
    return WorkerError(f"{path} {what}; refusing to use it. Remove it, or set {RUNTIME_DIR_ENV} to "
                       f"a directory of your own")


def _private_dir(path: Path) -> Path:
    """Create `path` as a 0700 directory, or check that the one there is ours and private.

    The shared temp folder is writable by every local user, so whatever is at `path` may have
    been planted there: nothing here follows a symbolic link (mkdir never does; the directory
    is then opened with O_NOFOLLOW and checked and tightened through that descriptor), and a
    directory owned by someone else, or one others could have written into, is refused.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        if path.is_symlink():
            raise _refuse(path, f"is a symbolic link (to {os.readlink(path)}) owned by "
                                f"{_owner(path.lstat().st_uid)}, not a directory") from None
        raise _refuse(path, "exists and is not a directory") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise _refuse(path, f"belongs to {_owner(info.st_uid)}, not to you (uid {os.getuid()})")
        if stat.S_IMODE(info.st_mode) & 0o022:
            raise _refuse(path, f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o}), "
                                f"so what is inside cannot be trusted")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that never follows a link at `path` (a planted link must not redirect a write)."""
    return os.open(path, flags | os.O_NOFOLLOW, mode)


def read_key(key_path: Path) -> bytes:
    """A worker directory's existing key, refused if it is not ours or others can read it."""
    with os.fdopen(open_private(key_path, os.O_RDONLY), "rb") as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise WorkerError(f"{key_path} is readable by others or not yours; delete it and retry")
        return f.read()


def read_or_create_key(directory: Path) -> bytes:
    """The channel's shared secret, created once per worker directory with mode 0600."""
    key_path = directory / KEY_NAME
    try:
        fd = open_private(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return read_key(key_path)
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


@contextmanager
def _spawn_lock(directory: Path) -> Iterator[None]:
    with os.fdopen(open_private(directory / "spawn.lock", os.O_WRONLY | os.O_CREAT), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def worker_log_tail(run_id: int, node_id: int, lines: int = 12) -> str | None:
    """The last lines of a node's worker log where this machine holds it (simulation, or a
    node on the server's machine); None where it does not."""
    path = runtime_root_path() / worker_dir_name(run_id, node_id) / LOG_NAME
    try:
        f = os.fdopen(open_private(path, os.O_RDONLY), "rb")
    except OSError:
        return None
    with f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def tell_other_runs(run_id: int) -> None:
    """Tell the workers of other runs on this machine that run `run_id` is starting one: each
    then leaves as soon as its own run has sent it nothing for a while (worker_process), so a
    run whose server failed or was killed stops holding its memory."""
    root = runtime_root()
    for entry in os.scandir(root):
        socket_path = os.path.join(entry.path, SOCKET_NAME)
        if (entry.name.startswith(run_prefix(run_id))
                or not entry.is_dir(follow_symlinks=False) or not os.path.exists(socket_path)):
            continue
        try:
            with Client(socket_path, family="AF_UNIX", authkey=read_key(Path(entry.path) / KEY_NAME)) as conn:
                send_message(conn, {"kind": ANOTHER_RUN})
                if conn.poll(5):
                    recv_message(conn)
        except (OSError, EOFError, AuthenticationError, WorkerError):
            pass  # a dead worker's leftovers, or one that is busy: its idle timeout still holds


class WorkerHandle:
    """The adapter's side: start the node's worker if it is not running, then call it."""

    def __init__(self, run_id: int, node_id: int):
        self.run_id, self.node_id = run_id, node_id
        self.directory = worker_dir(run_id, node_id)
        self.socket_path = str(self.directory / SOCKET_NAME)
        self.key = read_or_create_key(self.directory)

    def _connect(self) -> Connection:
        return Client(self.socket_path, family="AF_UNIX", authkey=self.key)

    def is_running(self) -> bool:
        try:
            with self._connect() as conn:
                send_message(conn, {"kind": "ping"})
                return bool(conn.poll(10)) and recv_message(conn).get("ok", False)
        except (OSError, EOFError):
            return False

    def ensure_running(self, watch_pid: int, idle_timeout: float, yield_after: float | None = None,
                       start_timeout: float = 120.0) -> None:
        """Start the worker process unless one already answers on the socket.

        The worker exits on its own when `watch_pid` (the process that stands for the node:
        the SuperNode in deployment, the Ray raylet in simulation) goes away, when it has
        been idle for `idle_timeout` seconds, once another run has started here and it has been
        idle for `yield_after` seconds (default: `idle_timeout`), or when asked to shut down.
        Starting one first tells the other runs' workers here (`tell_other_runs`).
        """
        with _spawn_lock(self.directory):
            if self.is_running():
                return
            tell_other_runs(self.run_id)
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)  # stale socket of a dead worker
            code_root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [code_root, env.get("PYTHONPATH")]))
            _restore_visible_gpus(env)
            with os.fdopen(open_private(self.directory / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
                           "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "clients.worker_process", "--dir", str(self.directory),
                     "--watch-pid", str(watch_pid), "--idle-timeout", str(idle_timeout),
                     "--yield-after", str(idle_timeout if yield_after is None else yield_after)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    # Its own session: a Ray actor being recycled must not take the worker along;
                    # the worker's watchdog ends it when the node itself goes away.
                    start_new_session=True,
                )
            # Reap it when it exits, so a long-lived adapter (a Ray actor) collects no zombies;
            # where the adapter exits first (deployment), init adopts and reaps it.
            threading.Thread(target=process.wait, daemon=True).start()
            deadline = time.monotonic() + start_timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise WorkerError(
                        f"worker process exited with code {process.returncode} while starting; "
                        f"see {self.directory / LOG_NAME}"
                    )
                if os.path.exists(self.socket_path) and self.is_running():
                    return
                time.sleep(0.05)
            process.kill()
            raise WorkerError(f"worker did not start within {start_timeout:.0f}s; see {self.directory / LOG_NAME}")

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait up to `timeout` seconds for its reply."""
        try:
            with self._connect() as conn:
                round_events.record("adapter_connected", request.get("round"), self.node_id)
                send_message(conn, request)
                round_events.record("request_sent", request.get("round"), self.node_id)
                if not conn.poll(timeout):
                    raise WorkerError(f"worker did not answer '{request.get('kind')}' within {timeout:.0f}s")
                reply = recv_message(conn)
                round_events.record("reply_received", request.get("round"), self.node_id)
        except (OSError, EOFError) as err:
            raise WorkerError(f"lost the worker while waiting for '{request.get('kind')}': {err}; "
                              f"see {self.directory / LOG_NAME}") from err
        if "error" in reply:
            raise WorkerError(f"worker failed on '{request.get('kind')}':\n{reply['error']}")
        return reply


# Ray hides GPUs from ClientApps that reserve none. The adapter needs no GPU, but the
# worker does: `fl-diloco train` records the real visibility before Ray starts, and the worker
# gets it back here.
VISIBLE_GPUS_ENV = "FL_DILOCO_VISIBLE_GPUS"


def _restore_visible_gpus(env: dict[str, str]) -> None:
    saved = env.get(VISIBLE_GPUS_ENV)
    if saved is None:
        return
    if saved == "all":
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = saved
