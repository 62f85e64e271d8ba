"""`fl-diloco supernode`: Flower's SuperNode with its fixed waits shortened (fl_diloco/supernode.py).

The guard must pass on the pinned Flower and fail on any copy of its loop that sleeps elsewhere
or otherwise, or that pulls a message's objects other than through the `pull_objects` it
replaces, so that a Flower upgrade that changes the loop fails here before the launcher
patches the wrong thing. Then the launcher itself serves a real run: an insecure SuperLink and
two SuperNodes started as `fl-diloco supernode --poll-interval 0.2`, a 2-round `flwr run`, and
everything started is gone at the end.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import time

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec import run_superexec
from flwr.supernode import start_client_internal

from fl_diloco import supernode
from tests.test_flwr_run import wait_until_none_started_with
from tests.test_secure_deployment import BIN, ROOT, Deployment, children, free_ports, json_from, stop_all

SUPERNODE_SOURCE = inspect.getsource(start_client_internal)
SUPEREXEC_SOURCE = inspect.getsource(run_superexec)
INFLATABLE_SOURCE = inspect.getsource(inflatable_utils)
RUN_CONFIG = ('model="tiny" num_clients=2 inner_steps=2 rounds=2 batch_size=4 seq_len=32 '
              'max_documents=150 eval_sequences=32 eval_every=1 warmup_steps=2 threads_per_worker=1')


def test_guard_passes_on_the_installed_flower():
    assert supernode.sleep_calls(SUPERNODE_SOURCE) == list(supernode.EXPECTED_SLEEPS)
    assert supernode.loop_shape_problem(SUPERNODE_SOURCE, SUPEREXEC_SOURCE, INFLATABLE_SOURCE) is None
    supernode.check_flower_loop()


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, f"{old!r} is not in the source any more"
    return text.replace(old, new, 1)


# Each a change a Flower release could make to the loop the launcher patches.
SUPERNODE_CHANGES = {
    "idle poll of 2 s": lambda s: _replace_once(s, "time.sleep(3)", "time.sleep(2)"),
    "idle poll from a constant": lambda s: _replace_once(s, "time.sleep(3)", "time.sleep(POLL_INTERVAL)"),
    "no wait for the reply": lambda s: _replace_once(s, "        time.sleep(0.5)\n", "        pass\n"),
    "an extra wait": lambda s: _replace_once(s, "    _push_messages(\n", "    time.sleep(1)\n    _push_messages(\n"),
    "sleep imported by name": lambda s: _replace_once(s, "import time\n", "from time import sleep\n")
                                                     .replace("time.sleep(", "sleep("),
    "time imported under another name": lambda s: _replace_once(s, "import time\n", "import time as clock\n")
                                                     .replace("time.sleep(", "clock.sleep("),
}
PULL_CALL = "obj_contents = pull_objects(\n"
PULL_FN_ARGUMENT = "pull_object_fn=lambda obj_id: pull_object(run_id, obj_id),"
PULL_IMPORT = "from flwr.supercore.inflatable.inflatable_utils import (\n    pull_objects,\n"
# Each a change after which replacing start_client_internal.pull_objects would not shorten the pull.
OBJECT_PULL_CHANGES = {
    "pulls through the module": lambda s: _replace_once(s, PULL_CALL, "obj_contents = inflatable_utils.pull_objects(\n"),
    "pulls through another function": lambda s: _replace_once(s, PULL_CALL, "obj_contents = pull_all_objects(\n"),
    "pull_objects imported under another name": lambda s: _replace_once(s, PULL_IMPORT, PULL_IMPORT.replace(
        "pull_objects,", "pull_objects as pull,")),
    "pull_objects from elsewhere": lambda s: _replace_once(s, PULL_IMPORT, PULL_IMPORT.replace(
        "inflatable_utils", "object_pull")),
    "its own backoff at the call": lambda s: _replace_once(s, PULL_FN_ARGUMENT, PULL_FN_ARGUMENT + "initial_backoff=1, "),
}
PULL_SIGNATURE = "    initial_backoff: float = PULL_INITIAL_BACKOFF,\n    backoff_cap: float = PULL_BACKOFF_CAP,\n) -> dict"
INFLATABLE_CHANGES = {
    "no backoff keywords": lambda s: _replace_once(s, PULL_SIGNATURE, ") -> dict"),
    "backoff keywords renamed": lambda s: _replace_once(s, PULL_SIGNATURE, PULL_SIGNATURE.replace(
        "initial_backoff", "first_backoff")),
}
SUPEREXEC_CHANGES = {
    "task poll variable renamed": lambda s: s.replace("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "FLWR_TASK_POLL"),
    "task poll default of 2 s": lambda s: _replace_once(s, "_SECONDS = 1.0", "_SECONDS = 2.0"),
}


@pytest.mark.parametrize("change", SUPERNODE_CHANGES)
def test_guard_fails_on_a_changed_supernode_loop(change):
    changed = SUPERNODE_CHANGES[change](SUPERNODE_SOURCE)
    assert supernode.loop_shape_problem(changed, SUPEREXEC_SOURCE, INFLATABLE_SOURCE) is not None


@pytest.mark.parametrize("change", SUPEREXEC_CHANGES)
def test_guard_fails_on_a_changed_superexec_poll(change):
    changed = SUPEREXEC_CHANGES[change](SUPEREXEC_SOURCE)
    assert supernode.loop_shape_problem(SUPERNODE_SOURCE, changed, INFLATABLE_SOURCE) is not None


@pytest.mark.parametrize("change", OBJECT_PULL_CHANGES)
def test_guard_fails_when_the_supernode_pulls_objects_otherwise(change):
    changed = OBJECT_PULL_CHANGES[change](SUPERNODE_SOURCE)
    assert supernode.sleep_calls(changed) == list(supernode.EXPECTED_SLEEPS)  # only the pull changed
    problem = supernode.loop_shape_problem(changed, SUPEREXEC_SOURCE, INFLATABLE_SOURCE)
    assert problem is not None and "pull_objects" in problem


@pytest.mark.parametrize("change", INFLATABLE_CHANGES)
def test_guard_fails_when_flowers_pull_loses_its_backoff_keywords(change):
    changed = INFLATABLE_CHANGES[change](INFLATABLE_SOURCE)
    problem = supernode.loop_shape_problem(SUPERNODE_SOURCE, SUPEREXEC_SOURCE, changed)
    assert problem is not None and "initial_backoff" in problem


def test_launcher_refuses_to_start_a_changed_flower_in_one_sentence(monkeypatch, capsys):
    original = inspect.getsource

    def changed_source(obj):
        text = original(obj)
        return text.replace("time.sleep(3)", "time.sleep(2)") if obj is start_client_internal else text

    monkeypatch.setattr(supernode.inspect, "getsource", changed_source)
    monkeypatch.setattr(supernode.importlib.metadata, "version", lambda name: "9.9.9")
    started = []
    monkeypatch.setattr("flwr.supernode.cli.flower_supernode", lambda: started.append(True))
    assert supernode.main(["--poll-interval", "0.2", "--insecure"]) == 2
    error = capsys.readouterr().err
    assert not started
    assert "Flower 9.9.9" in error and f"Flower {supernode.PATCHED_FLOWER}" in error
    assert "time.sleep(2) in start_client_internal" in error
    assert error.count(". ") == 0 and error.strip().endswith("instead")


@pytest.mark.parametrize("argv, interval, rest", [
    (["--insecure", "--superlink", "127.0.0.1:9092"], supernode.DEFAULT_POLL_INTERVAL,
     ["--insecure", "--superlink", "127.0.0.1:9092"]),
    (["--insecure", "--poll-interval", "0.5", "--node-config", "partition-id=0 num-partitions=2"], 0.5,
     ["--insecure", "--node-config", "partition-id=0 num-partitions=2"]),
    (["--poll-interval=1", "--port", "9095"], 1.0, ["--port", "9095"]),
])
def test_poll_interval_is_taken_out_and_everything_else_passes_unchanged(argv, interval, rest):
    assert supernode.split_poll_interval(argv) == (interval, rest)


@pytest.mark.parametrize("argv", [["--poll-interval"], ["--poll-interval", "fast"], ["--poll-interval=0"],
                                  ["--poll-interval", "0.001"], ["--poll-interval", "nan"], ["--poll-interval=inf"]])
def test_a_bad_poll_interval_is_refused(argv, capsys):
    with pytest.raises(ValueError, match="--poll-interval"):
        supernode.split_poll_interval(argv)
    assert supernode.main(argv) == 2
    assert "--poll-interval" in capsys.readouterr().err


@pytest.mark.parametrize("poll, idle, reply, superexec", [(0.2, 0.2, 0.2, "0.2"), (2.0, 2.0, 0.5, "1.0"),
                                                        (5.0, 5.0, 0.5, "1.0")])
def test_the_fixed_waits_become_the_poll_interval_at_most(monkeypatch, poll, idle, reply, superexec):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    module, environ = type(sys)("fake_start_client_internal"), {}
    supernode.shorten_waits(poll, module, environ)
    for seconds in (supernode.IDLE_POLL_S, supernode.REPLY_WAIT_S, 0.7):
        module.time.sleep(seconds)
    assert slept == [idle, reply, 0.7]  # any other wait is Flower's own
    assert module.time.monotonic is time.monotonic
    assert module.pull_objects.func is inflatable_utils.pull_objects  # retries after 20 ms (test_pull_backoff)
    assert module.pull_objects.keywords["initial_backoff"] < supernode.REPLY_WAIT_S
    assert environ == {supernode.SUPEREXEC_POLL_ENV: superexec}
    # A task poll interval the user set stays theirs.
    environ = {supernode.SUPEREXEC_POLL_ENV: "0.05"}
    supernode.shorten_waits(poll, module, environ)
    assert environ == {supernode.SUPEREXEC_POLL_ENV: "0.05"}


@pytest.mark.skipif(not (BIN / "flower-superlink").exists() or not (BIN / "fl-diloco").exists(),
                    reason=f"flower-superlink or fl-diloco is not installed next to {sys.executable}")
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds processes through /proc")
def test_short_poll_supernodes_serve_a_real_run_and_stop(tmp_path):
    out_dir = tmp_path / "run"
    superlink_port, *node_ports = free_ports(3)
    deployment = Deployment.in_temp_dir(tmp_path, "local-test", f'address = "127.0.0.1:{superlink_port}"\ninsecure = true')
    deployment.env.pop(supernode.SUPEREXEC_POLL_ENV, None)
    try:
        link = deployment.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
                                "--port", str(superlink_port), "--database", str(tmp_path / "superlink.db"))
        deployment.wait_for_log("superlink", link, "Uvicorn running on", timeout=120)
        nodes = [deployment.start(f"node-{i}", "fl-diloco", "supernode", "--poll-interval", "0.2", "--insecure",
                                  "--superlink", f"127.0.0.1:{superlink_port}", "--port", str(node_ports[i]),
                                  "--node-config", f"partition-id={i} num-partitions=2")
                 for i in range(2)]
        run_id = json_from(deployment.flwr("run", ".", "local-test", "--run-config",
                                           f'{RUN_CONFIG} out_dir="{out_dir}"', "--format", "json"))["run-id"]
        summary = deployment.wait_for_summary(out_dir, run_id, watched=[link, *nodes])
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        # The SuperExec each launcher started polls for tasks at the short interval too.
        superexec_polls = [_environ(pid).get(supernode.SUPEREXEC_POLL_ENV)
                           for node in nodes for pid in children(node.pid) if "flower-superexec" in _command(pid)]
    finally:
        stop_all(deployment.processes)
        left_behind = wait_until_none_started_with(tmp_path / "flwr")

    assert summary["rounds"] == 2 and summary["num_clients"] == 2
    assert math.isfinite(summary["final_eval_loss"])
    assert [r["round"] for r in records] == [0, 1, 2]
    # Both SuperNodes trained in every round.
    assert all(sorted(c["partition_id"] for c in r["clients"]) == [0, 1] for r in records[1:])
    assert superexec_polls == ["0.2", "0.2"]
    assert not left_behind, f"left running: {left_behind}"


def _environ(pid: int) -> dict[str, str]:
    entries = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def _command(pid: int) -> str:
    return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")


def test_fl_diloco_dispatches_supernode(capsys):
    from fl_diloco.cli import main

    assert main(["supernode", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: fl-diloco supernode [--poll-interval SECONDS]")


def test_local_deployment_refuses_a_bad_poll_before_starting_anything(tmp_path):
    env = {**os.environ, "FL_DILOCO_SUPERNODE_POLL": "fast", "FL_DILOCO_DEPLOYMENT_DIR": str(tmp_path / "dep"),
           "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(ROOT / "scripts" / "local_deployment.sh"), "up", "--insecure", "1"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "FL_DILOCO_SUPERNODE_POLL must be a number of seconds" in result.stderr
    assert not (tmp_path / "dep" / "pids").exists() and not (tmp_path / "flwr").exists()
