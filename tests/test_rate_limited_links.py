"""scripts/rate_limited_links.sh: one shaped link, without Flower.

As root on a kernel with network namespaces, veth and tbf: `up 1 --rate 8mbit --no-flower`
must put a tbf of 8 Mbit/s on both ends of the link, a few hundred kB must take about the
time that rate implies in each direction (loose bounds: this checks that shaping is in
force, it is no timing test of our code), and `down` must leave no namespace, link or
record behind. Elsewhere (not root, no `ip`/`tc`, no namespaces) the script says why and
those tests skip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rate_limited_links.sh"
NAME, PREFIX = "fldtest", "10.214"  # not the script's defaults, so a running bench is left alone
RATE_MBIT = 8
PAYLOAD = 600_000  # bytes: 0.6 s at 8 Mbit/s, about 1 ms on an unshaped veth
UNSUPPORTED = 3

# Runs inside the namespace: connect to the host end, then send or receive PAYLOAD bytes.
PEER = """
import socket, sys
host, port, size, direction = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conn = socket.create_connection((host, port), timeout=30)
if direction == "up":
    conn.sendall(bytes(size)); conn.shutdown(socket.SHUT_WR); conn.recv(1)
else:
    got = 0
    while got < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
    conn.sendall(b"k")
"""


def script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "FL_DILOCO_LINKS_DIR": str(tmp_path / "links")}


@pytest.fixture
def one_link(env):
    check = script("check", env=env)
    if check.returncode == UNSUPPORTED:
        pytest.skip(check.stderr.strip())
    assert check.returncode == 0, check.stderr
    up = script("up", "1", "--rate", f"{RATE_MBIT}mbit", "--no-flower", "--name", NAME,
                "--prefix", PREFIX, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield env
    finally:
        script("down", env=env)


def _transfer_seconds(direction: str) -> float:
    """Seconds for PAYLOAD bytes to cross the link, timed on the host end."""
    host = f"{PREFIX}.0.1"
    with socket.create_server((host, 0)) as server:
        server.settimeout(30)
        peer = subprocess.Popen(["ip", "netns", "exec", f"{NAME}-0", sys.executable, "-c", PEER, host,
                                 str(server.getsockname()[1]), str(PAYLOAD), direction])
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                if direction == "up":
                    first = conn.recv(1 << 16)
                    began, got = time.perf_counter(), len(first)
                    while chunk := conn.recv(1 << 16):
                        got += len(chunk)
                    elapsed = time.perf_counter() - began
                    conn.sendall(b"k")
                    assert got == PAYLOAD
                else:
                    began = time.perf_counter()
                    conn.sendall(bytes(PAYLOAD))
                    assert conn.recv(1) == b"k"
                    elapsed = time.perf_counter() - began
        finally:
            peer.wait(timeout=30)
    return elapsed


def test_one_link_is_shaped_both_ways_and_down_removes_everything(one_link):
    env = one_link
    for command in (["tc", "qdisc", "show", "dev", f"{NAME}-h0"],
                    ["tc", "-n", f"{NAME}-0", "qdisc", "show", "dev", f"{NAME}-n0"]):
        qdisc = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and f"rate {RATE_MBIT}Mbit" in qdisc, qdisc

    expected = PAYLOAD * 8 / (RATE_MBIT * 1e6)
    for direction in ("up", "down"):
        elapsed = _transfer_seconds(direction)
        # tbf lets its 64 kB burst through at once; an unshaped veth would take ~1 ms.
        assert 0.6 * expected < elapsed < 20 * expected, (direction, elapsed, expected)

    down = script("down", env=env)
    assert down.returncode == 0, down.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{NAME}-0" not in namespaces
    assert subprocess.run(["ip", "link", "show", f"{NAME}-h0"], capture_output=True).returncode != 0
    assert not (Path(env["FL_DILOCO_LINKS_DIR"]) / "created").exists()
    assert script("status", env=env).stdout.strip() == "nothing is up"


def test_usage_errors_name_what_to_fix(env):
    """These fail before touching the machine, so they run anywhere (no root needed)."""
    bad_n = script("up", "0", env=env)
    assert bad_n.returncode == 2 and "N must be" in bad_n.stderr
    unknown = script("sideways", env=env)
    assert unknown.returncode == 2 and "usage:" in unknown.stderr
    assert script("down", env=env).stdout.strip() == "nothing is up"
