"""Entry point of a node's persistent worker process: `python -m clients.worker_process`.

It serves requests from the node's ClientApp adapter over the private channel (see
`clients.channel`) until one of four things ends it: a `shutdown` request at the end of
the run, the node going away (the watched pid disappears), no request for `--idle-timeout`
seconds, or, once another run has started a worker on this machine, no request for
`--yield-after` seconds (a run whose server is alive sends one at least every round_timeout,
so this worker's server failed or was killed: its memory goes to the new run). It never
outlives its node, so no orphan is left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

from clients.channel import ANOTHER_RUN, KEY_NAME, PID_NAME, SOCKET_NAME, recv_message, send_message
from clients.worker import Worker
from fl_diloco import round_events


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=900.0)
    parser.add_argument("--yield-after", type=float, default=None)
    args = parser.parse_args(argv)

    socket_path = args.dir / SOCKET_NAME
    key = (args.dir / KEY_NAME).read_bytes()
    old_umask = os.umask(0o177)  # the socket file itself: owner read/write only
    listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    os.umask(old_umask)
    (args.dir / PID_NAME).write_text(str(os.getpid()))
    print(f"worker {os.getpid()} serving {socket_path}, watching pid {args.watch_pid}", flush=True)

    last_request = [time.monotonic()]
    open_requests = [0]  # requests being served; a worker waiting on its own training is not idle
    counter = threading.Lock()
    another_run = threading.Event()  # set once another run has started a worker here

    worker = Worker()

    def stop(reason: str, clean: bool = False) -> None:
        print(f"worker {os.getpid()} exiting: {reason}", flush=True)
        if worker.site is not None:  # never leave the site's other ranks behind
            worker.site.kill()
        # A clean end removes the directory; otherwise its log stays for a post-mortem.
        if clean:
            shutil.rmtree(args.dir, ignore_errors=True)
        else:
            socket_path.unlink(missing_ok=True)
        os._exit(0)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if not _pid_alive(args.watch_pid):
                stop(f"node process {args.watch_pid} is gone")
            idle = 0.0 if open_requests[0] else time.monotonic() - last_request[0]
            if idle > args.idle_timeout:
                stop(f"no request for {args.idle_timeout:.0f}s")
            if another_run.is_set() and args.yield_after is not None and idle > args.yield_after:
                stop(f"another run started on this machine and this one sent nothing for "
                     f"{args.yield_after:.0f}s: its server is gone")

    # A broken site group (a rank died, a collective timed out) ends this process like a
    # crash: the node's next message starts a fresh worker, which resyncs from the server.
    worker.on_site_failure = lambda reason: stop(f"the site's group broke: {reason}")

    def serve(conn) -> None:
        # One thread per request: a round's request waits for the inner loop, while the next
        # round's request may already be delivering the average that loop needs.
        with conn:
            try:
                request = recv_message(conn)
            except EOFError:
                return
            if request.get("kind") == "train":
                round_events.record("worker_received", request.get("round"), partition=request.get("partition_id"))
            if request.get("kind") == ANOTHER_RUN:  # news, not a request of our own run
                another_run.set()
                send_message(conn, {"ok": True})
                return
            with counter:
                open_requests[0] += 1
                last_request[0] = time.monotonic()
            try:
                reply = worker.handle(request)
                try:
                    send_message(conn, reply)
                except OSError as err:
                    print(f"could not send the reply to '{request.get('kind')}': {err}", flush=True)
            finally:
                with counter:
                    open_requests[0] -= 1
                    last_request[0] = time.monotonic()
        if request.get("kind") == "shutdown":
            stop("shutdown requested", clean=True)

    threading.Thread(target=watchdog, daemon=True).start()
    while True:
        try:
            conn = listener.accept()
        except Exception as err:  # noqa: BLE001 - a failed handshake must not kill the worker
            print(f"rejected a connection: {err!r}", flush=True)
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
