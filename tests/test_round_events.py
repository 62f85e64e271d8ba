"""fl_diloco/round_events.py: off unless asked for, and then one well-formed line per event."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fl_diloco import round_events

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_is_written_when_the_events_file_is_not_set(tmp_path, monkeypatch):
    monkeypatch.setattr(round_events, "_path", None)
    monkeypatch.chdir(tmp_path)
    round_events.record("delta_ready", 3, partition=0)
    assert not round_events.enabled()
    assert list(tmp_path.iterdir()) == []


def test_each_event_is_one_json_line_with_its_round_node_and_time(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setattr(round_events, "_path", str(path))
    before = time.time()
    round_events.record("reply_pulled", 4, 17, message_id="abc")
    round_events.record("clientapp_started", 5, 17, t=123.5)
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["event"] == "reply_pulled" and first["round"] == 4 and first["node"] == 17
    assert first["message_id"] == "abc" and first["pid"] == os.getpid() and before <= first["t"] <= time.time()
    assert second["t"] == 123.5


def test_the_process_start_time_lies_between_its_launch_and_its_first_line():
    code = "from fl_diloco import round_events; import time; print(round_events.process_start_time(), time.time())"
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    started, first_line = map(float, out.split())
    tick = 0.02  # /proc counts in 10 ms ticks
    assert launched - tick <= started <= first_line + tick
