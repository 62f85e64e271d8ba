"""The README's `flwr run .` quickstart, from a Flower configuration that does not exist yet.

`flwr run .` with Flower's default `local` connection starts a SuperLink in the background
(simulation mode) and leaves it running; `scripts/local_superlink.sh stop` is how the README
stops it. The test gives Flower a fresh FLWR_HOME in a temp dir (the user's ~/.flwr is never
touched) and the local SuperLink a free port, trains 2 rounds on 2 simulated SuperNodes sized
with `--federation-config` as the README does, then stops exactly that SuperLink and checks
nothing it started is left, while a look-alike of someone else's SuperLink survives.

`flwr run` exits 0 even when the run fails, so the run counts as finished only when its
summary.json says so.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_diloco.simulation import simulate
from tests.conftest import small_config
from tests.test_secure_deployment import free_ports

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STOP_SCRIPT = ROOT / "scripts" / "local_superlink.sh"
RUN_CONFIG = ('model="tiny" num_clients=2 inner_steps=3 rounds=2 batch_size=4 seq_len=32 '
              'max_documents=150 eval_sequences=32 eval_every=1 warmup_steps=2 threads_per_worker=1')
# What the README's quickstart passes, for 2 SuperNodes instead of 4.
FEDERATION_CONFIG = "num_supernodes=2 client_resources_num_cpus=1"
# Limits that only catch a hang: a loaded 2-core machine needs minutes for a run of seconds.
RUN_TIMEOUT = 600
SCRIPT_TIMEOUT = 60



def local_superlink(env: dict[str, str], command: str) -> str:
    result = subprocess.run([str(STOP_SCRIPT), command], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert result.returncode == 0, f"local_superlink.sh {command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def superlink_pid(status: str) -> int:
    """The pid in `local_superlink.sh status` output ("local SuperLink (pid N) for ...")."""
    assert "(pid " in status, f"`flwr run` left no local SuperLink for our FLWR_HOME:\n{status}"
    return int(status.split("(pid ", 1)[1].split(")", 1)[0])


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent (pid 1) to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def started_with(flwr_home: Path) -> list[int]:
    """Live processes whose environment has FLWR_HOME=`flwr_home`: everything `flwr run` started,
    Ray's and the workers included, even those no longer below the SuperLink."""
    entry = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in environ.read_bytes().split(b"\0") and alive(int(environ.parent.name)):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def wait_until_none_started_with(flwr_home: Path) -> list[int]:
    """Processes exit on their own after the SuperLink; the ones still there after a minute."""
    for _ in range(SCRIPT_TIMEOUT * 5):
        if not (left := started_with(flwr_home)):
            break
        time.sleep(0.2)
    return left


@pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                    reason=f"flower-superlink is not installed next to {sys.executable}")
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")
def test_flwr_run_quickstart_trains_and_its_superlink_stops_alone(tmp_path):
    flwr_home, out_dir = tmp_path / "flwr", tmp_path / "run"
    (port,) = free_ports(1)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "PYTHON": sys.executable, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Someone else's local SuperLink, as `pgrep -f` sees it: another FLWR_HOME's log file.
    other_log = tmp_path / "other-flwr" / "local-superlink" / "superlink.log"
    look_alike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "flower-superlink",
                                   "--simulation", "--log-file", str(other_log)])
    try:
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "--federation-config", FEDERATION_CONFIG,
                              "--run-config", f'{RUN_CONFIG} out_dir="{out_dir}"', "--stream"],
                             check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output

        summary_path = out_dir / "summary.json"
        assert summary_path.exists(), f"the run did not finish:\n{output}"
        summary = json.loads(summary_path.read_text())
        assert summary["rounds"] == 2 and summary["num_clients"] == 2
        assert math.isfinite(summary["final_eval_loss"])
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1, 2]
        # Both simulated SuperNodes trained in every round.
        assert all(len({c["node_id"] for c in r["clients"]}) == 2 for r in records[1:])
    finally:
        status = local_superlink(env, "status")
        running = started_with(flwr_home)
        stopped = local_superlink(env, "stop")
        left_behind = wait_until_none_started_with(flwr_home)
        look_alike_survived = look_alike.poll() is None
        look_alike.kill()
        look_alike.wait()
    pid = superlink_pid(status)
    assert pid in running  # so that an empty `left_behind` means something
    assert f"stopped the local SuperLink (pid {pid})" in stopped
    assert not alive(pid) and not left_behind, f"left running after stop: {pid}, {left_behind}"
    assert look_alike_survived, "stop killed a SuperLink of another FLWR_HOME"
    assert "no local SuperLink running" in local_superlink(env, "status")

def test_train_prints_no_run_simulation_deprecation_banner(tmp_path, monkeypatch):
    """`fl-diloco train` keeps Flower's deprecated run_simulation (README says why) without its banner."""
    # The module, not the function of the same name that flwr.simulation re-exports.
    flower_simulation = importlib.import_module("flwr.simulation.run_simulation")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    flower_logger = logging.getLogger("flwr")
    # Flower logs the banner before anything else; the simulation itself is not needed here.
    monkeypatch.setattr(flower_simulation, "_run_simulation", lambda **kwargs: None)
    flower_logger.addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="without writing"):
            simulate(small_config(tmp_path))
        assert not [r for r in records if "DEPRECATED" in r.getMessage()]
        # The filter is gone afterwards: Flower's own call still shows its banner.
        flower_simulation.run_simulation(server_app=None, client_app=None, num_supernodes=1)
        assert [r for r in records if "`run_simulation` function is deprecated" in r.getMessage()]
    finally:
        flower_logger.removeHandler(handler)
