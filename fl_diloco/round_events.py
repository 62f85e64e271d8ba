"""Opt-in timestamps of a round's steps, written by every process a round passes through.

With $FL_DILOCO_ROUND_EVENTS set to a file path, the ServerApp, each ClientApp adapter and
each node's worker append one JSON line per step to that file:
{"event": ..., "round": r, "node": node_id, "t": time.time(), ...}. The processes of a
deployment on one machine share a clock, so bench/deployment_round_anatomy.py can join the
lines per round and attribute a round's wall time to its steps. Unset (the default), `record`
returns at once and nothing is written. Import-light on purpose: the adapter imports it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

EVENTS_ENV = "FL_DILOCO_ROUND_EVENTS"
_path = os.environ.get(EVENTS_ENV) or None


def enabled() -> bool:
    return _path is not None


def record(event: str, round: int | None = None, node: int | None = None, t: float | None = None,
           **fields: Any) -> None:
    """Append one event (at time `t`, default now) to the events file, if there is one."""
    if _path is None:
        return
    line = json.dumps({"event": event, "round": round, "node": node,
                       "t": time.time() if t is None else t, "pid": os.getpid(), **fields})
    # One write of one line with O_APPEND: lines of concurrent processes never interleave.
    fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def process_start_time() -> float | None:
    """When this process started, as time.time() (Linux, to the kernel's 10 ms tick); None
    where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, clock ticks after boot); the command name before it may hold spaces.
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
