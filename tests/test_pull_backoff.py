"""The ServerApp's faster retry of a reply's objects (server_app.pull_objects_sooner) patches
pinned Flower's HttpGrid; these tests fail if Flower's code there changes shape."""

import inspect

from flwr.superlink.grid import http_grid
from flwr.supercore.inflatable import inflatable_utils

from fl_diloco.server_app import OBJECT_PULL_BACKOFF, pull_objects_sooner


def test_flowers_grid_pulls_objects_through_the_module_level_function_we_replace():
    assert "pull_objects" in http_grid.HttpGrid.pull_messages.__code__.co_names
    parameters = inspect.signature(inflatable_utils.pull_objects).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(parameters)


def test_the_grid_then_retries_within_tens_of_milliseconds(monkeypatch):
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    defaults = inspect.signature(inflatable_utils.pull_objects).parameters
    assert defaults["initial_backoff"].default >= 1  # what Flower would wait before its first retry
    pull_objects_sooner()
    initial, cap = OBJECT_PULL_BACKOFF
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects
    assert http_grid.pull_objects.keywords == {"initial_backoff": initial, "backoff_cap": cap}
    assert initial <= 0.05 and cap < 1
