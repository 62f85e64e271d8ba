"""The faster retry of a message's objects (fl_diloco/object_pull.py) replaces the module-level
`pull_objects` of pinned Flower's HttpGrid (the ServerApp) and SuperNode loop (`fl-diloco
supernode`); these tests fail if Flower's code there changes shape or the retry stays Flower's.
(The SuperNode's side of the shape is also checked by its launcher's guard,
tests/test_supernode_launcher.py.)"""

import inspect
import subprocess
import sys
import threading
import types

import pytest
from flwr.superlink.grid import http_grid
from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode import start_client_internal

from fl_diloco.object_pull import BACKOFF_KEYWORDS, OBJECT_PULL_BACKOFF, pull_objects_sooner


def test_flowers_grid_pulls_objects_through_the_module_level_function_we_replace():
    assert "pull_objects" in http_grid.HttpGrid.pull_messages.__code__.co_names
    # (A test that ran the ServerApp in this process may already have replaced it: unwrap.)
    assert getattr(http_grid.pull_objects, "func", http_grid.pull_objects) is inflatable_utils.pull_objects
    defaults = inspect.signature(inflatable_utils.pull_objects).parameters
    assert set(BACKOFF_KEYWORDS) <= set(defaults)
    assert defaults["initial_backoff"].default >= 1  # what Flower would wait before its first retry


@pytest.mark.parametrize("flower_module", [http_grid, start_client_internal])
def test_both_patched_modules_then_retry_within_tens_of_milliseconds(monkeypatch, flower_module):
    monkeypatch.setattr(flower_module, "pull_objects", flower_module.pull_objects)  # restored after the test
    pull_objects_sooner(flower_module)
    pull_objects_sooner(flower_module)  # twice: the same as once
    initial, cap = OBJECT_PULL_BACKOFF
    assert flower_module.pull_objects.func is inflatable_utils.pull_objects
    assert flower_module.pull_objects.keywords == {"initial_backoff": initial, "backoff_cap": cap}
    assert initial <= 0.05 and cap < 1


class RecordingEvent(threading.Event):
    """An Event whose `wait` records the timeout and returns at once."""

    waits: list[float] = []

    def wait(self, timeout=None):
        RecordingEvent.waits.append(timeout)
        return self.is_set()


def test_the_patched_pull_waits_what_we_set_between_retries(monkeypatch):
    """Flower's pull itself, through the patched name: an object missing 5 times is retried
    after 20, 40, 80, 160, 200 ms (each ±20 % jitter), not 1, 2, 4, 8, 10 s."""
    monkeypatch.setattr(inflatable_utils, "threading",
                        types.SimpleNamespace(Lock=threading.Lock, Event=RecordingEvent))
    monkeypatch.setattr(RecordingEvent, "waits", [])
    module = types.ModuleType("a_flower_module")
    pull_objects_sooner(module)
    misses = iter(range(5))

    def pull_object(object_id: str) -> bytes:
        if next(misses, None) is not None:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    assert module.pull_objects(["object"], pull_object, max_concurrent_pulls=1) == {"object": b"content"}
    initial, cap = OBJECT_PULL_BACKOFF
    expected = [min(initial * 2**i, cap) for i in range(5)]
    assert len(RecordingEvent.waits) == 5
    assert all(0.8 * e <= w <= 1.2 * e for w, e in zip(RecordingEvent.waits, expected, strict=True))


def test_the_supernode_launcher_and_its_patch_import_no_torch():
    code = "import sys, fl_diloco.object_pull, fl_diloco.supernode; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
