"""Flower's retry of a message's objects, made tens of milliseconds instead of seconds.

Flower 1.41 moves a message as a tree of objects, and whoever receives it may learn of the
message before all of its objects have arrived at the hop it pulls from: the SuperLink hands
out a message as soon as the sender announces it, while the sender is still pushing the
objects. The receiver's `pull_objects` (flwr.supercore.inflatable.inflatable_utils) then
retries a missing object after 1 s, doubling up to 10 s, which cost seconds a round
(bench/deployment_round_anatomy.py). `pull_objects_sooner(module)` makes the `pull_objects`
that `module` calls retry after 20 ms, doubling up to 200 ms, in this process only:

- the ServerApp: flwr.superlink.grid.http_grid, whose HttpGrid pulls each reply's objects
  (fl_diloco/server_app.py);
- `fl-diloco supernode`: flwr.supernode.start_client_internal, whose main loop pulls each
  message's objects from the SuperLink (fl_diloco/supernode.py).

It imports no torch, so the SuperNode launcher stays light. Tests that fail if Flower's code
changes shape: tests/test_pull_backoff.py and tests/test_supernode_launcher.py.
"""

from __future__ import annotations

import functools
from types import ModuleType

from flwr.supercore.inflatable import inflatable_utils

# (first retry, longest retry) in seconds; Flower's defaults are (1, 10).
OBJECT_PULL_BACKOFF = (0.02, 0.2)
BACKOFF_KEYWORDS = ("initial_backoff", "backoff_cap")


def pull_objects_sooner(module: ModuleType) -> None:
    """Make `module.pull_objects` (Flower's, imported there by name) retry a missing object
    within tens of milliseconds (module docstring). Calling it again changes nothing."""
    module.pull_objects = functools.partial(inflatable_utils.pull_objects,
                                            **dict(zip(BACKOFF_KEYWORDS, OBJECT_PULL_BACKOFF, strict=True)))
