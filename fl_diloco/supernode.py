"""`fl-diloco supernode`: Flower's own SuperNode, with its fixed waits shortened (opt-in).

    fl-diloco supernode [--poll-interval SECONDS] <flower-supernode arguments, unchanged>

runs the entry point of `flower-supernode` (flwr.supernode.cli.flower_supernode) in this process
after one change to the pinned Flower's behaviour: the fixed waits on a round's message path
last at most SECONDS (default 0.5) instead of Flower's constants. Without this command nothing
changes; `flower-supernode` stays the default everywhere in this project.

The waits of one round at a SuperNode, in Flower 1.41 (flwr/supernode/start_client_internal.py
and flwr/supercore/superexec/run_superexec.py), and what SECONDS does to each:

- 3 s: the main loop asks the SuperLink for a message and sleeps 3 s when there is none. A
  message pushed just after a poll waits up to 3 s. Shortened to SECONDS. This is the one that
  costs something: one more request to the SuperLink every SECONDS per SuperNode while idle.
- 1 s: the SuperExec, a child process of the SuperNode, asks the SuperNode's local runtime API
  for work every second and starts a ClientApp process for each message. Shortened to
  min(SECONDS, 1 s) through Flower's own setting, $FLWR_SUPEREXEC_TASK_POLL_INTERVAL (left
  alone when the environment sets it).
- 0.5 s, twice: while the ClientApp runs, the main loop checks every 0.5 s whether its reply is
  in the SuperNode's store, then whether the reply's contents are (the ClientApp pushes the
  message before its contents). Shortened to min(SECONDS, 0.5 s); both look at in-memory state
  of this process, so they cost no traffic.

One more wait is not a sleep: the main loop pulls a message's objects from the SuperLink with
Flower's `pull_objects`, which retries a missing object after 1 s, doubling up to 10 s. A short
poll takes a message while the ServerApp is still pushing its objects, so that retry then cost
seconds a round; it retries after 20 ms, doubling up to 200 ms, instead (fl_diloco/object_pull.py,
the same change the ServerApp makes to its own pulls).

The ClientApp process (`flwr-clientapp`, started per message by the SuperExec) pulls its message
from this SuperNode with the same 1 s retry when it starts before the SuperNode has all the
objects. It does so before it loads any code of ours, in a process the SuperExec starts by
its command name, so nothing here reaches it; with the SuperNode's pull shortened it rarely
finds an object missing (README, "Where a deployment round goes").

The mechanism: start_client_internal's module gets a `time` whose `sleep` maps those two
constants to their new values and passes every other call through, and a `pull_objects` with
the shorter retry. Because it matches the constants and the names, `check_flower_loop` first
verifies that the installed Flower sleeps exactly where and as long as 1.41 does and pulls
through a module-level `pull_objects` that takes the retry as keywords, and refuses to start
otherwise.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import math
import os
import sys
import textwrap
import time
from collections.abc import MutableMapping
from types import ModuleType

from fl_diloco.object_pull import BACKOFF_KEYWORDS, OBJECT_PULL_BACKOFF, pull_objects_sooner

# Measured on 2 loaded cores, 0.5 s and 1 s cut a round's overhead and 0.2 s added to it (README).
DEFAULT_POLL_INTERVAL = 0.5
# The SuperExec refuses a task poll interval below this (run_superexec._MIN_TASK_POLL_INTERVAL_SECONDS).
MIN_POLL_INTERVAL = 0.01
# The Flower whose loop this module was written against (pyproject.toml pins it).
PATCHED_FLOWER = "1.41.0"

IDLE_POLL_S = 3  # start_client_internal: a poll of the SuperLink found no message
REPLY_WAIT_S = 0.5  # _push_messages: the ClientApp's reply, or its contents, not stored yet
# Every sleep in flwr/supernode/start_client_internal.py: (function it is in, the call).
EXPECTED_SLEEPS = (
    ("start_client_internal", f"time.sleep({IDLE_POLL_S})"),
    ("_push_messages", f"time.sleep({REPLY_WAIT_S})"),
    ("yield_object_contents", f"time.sleep({REPLY_WAIT_S})"),  # inside _push_messages
)
# Where the `pull_objects` that start_client_internal calls comes from.
PULL_MODULE = "flwr.supercore.inflatable.inflatable_utils"
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = 1.0
# What flwr/supercore/superexec/run_superexec.py must contain for SUPEREXEC_POLL_ENV to work.
EXPECTED_SUPEREXEC_LINES = (
    f'_TASK_POLL_INTERVAL_ENV = "{SUPEREXEC_POLL_ENV}"',
    f"_DEFAULT_TASK_POLL_INTERVAL_SECONDS = {SUPEREXEC_POLL_S}",
    "raw_interval = os.getenv(_TASK_POLL_INTERVAL_ENV)",
    "time.sleep(task_poll_interval)",
)

USAGE = "usage: fl-diloco supernode [--poll-interval SECONDS] <flower-supernode arguments>\n\n" + textwrap.fill(
    f"Starts Flower's own SuperNode, as `flower-supernode <arguments>` does, with its fixed waits "
    f"shortened: the idle poll of the SuperLink ({IDLE_POLL_S} s in Flower) to SECONDS, the SuperExec's "
    f"task poll ({SUPEREXEC_POLL_S:g} s) and the waits for the ClientApp's reply ({REPLY_WAIT_S} s) to "
    f"at most SECONDS, and the first retry of a message's objects (1 s) to {OBJECT_PULL_BACKOFF[0]:g} s. "
    f"SECONDS defaults to {DEFAULT_POLL_INTERVAL}, at least {MIN_POLL_INTERVAL}. This "
    f"changes the pinned Flower's behaviour, and refuses to start on a Flower whose loop differs "
    f"(fl_diloco/supernode.py). The other arguments are flower-supernode's: `flower-supernode --help`.",
    width=96)


def split_poll_interval(argv: list[str]) -> tuple[float, list[str]]:
    """(`--poll-interval` value or the default, every other argument in its order)."""
    interval, rest, items = None, [], iter(argv)
    for item in items:
        if item == "--poll-interval":
            interval = next(items, None)
            if interval is None:
                raise ValueError("--poll-interval needs a number of seconds")
        elif item.startswith("--poll-interval="):
            interval = item.split("=", 1)[1]
        else:
            rest.append(item)
    if interval is None:
        return DEFAULT_POLL_INTERVAL, rest
    try:
        seconds = float(interval)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= MIN_POLL_INTERVAL):
        raise ValueError(f"--poll-interval must be a number of seconds >= {MIN_POLL_INTERVAL}, got {interval!r}")
    return seconds, rest


def sleep_calls(source: str) -> list[tuple[str, str]]:
    """Every call of a `sleep` in `source`, as (innermost enclosing function, the call's code)."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "sleep":
            found.append((function, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return found


def object_pull_problem(supernode_source: str, inflatable_source: str) -> str | None:
    """Why `pull_objects_sooner(start_client_internal)` would not shorten the SuperNode's object
    pull, or None: the module must import inflatable_utils' `pull_objects` by name and call it
    without backoff keywords, and that function must take the backoff keywords."""
    supernode_tree, inflatable_tree = ast.parse(supernode_source), ast.parse(inflatable_source)
    imported = any(isinstance(node, ast.ImportFrom) and node.module == PULL_MODULE
                   and any(alias.name == "pull_objects" and alias.asname in (None, "pull_objects")
                           for alias in node.names)
                   for node in supernode_tree.body)
    calls = [node for node in ast.walk(supernode_tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pull_objects"]
    if not (imported and calls):
        return f"its start_client_internal.py does not call `pull_objects` imported from {PULL_MODULE}"
    if any(keyword.arg in BACKOFF_KEYWORDS for call in calls for keyword in call.keywords):
        return "its start_client_internal.py passes its own backoff to `pull_objects`"
    definitions = [node for node in inflatable_tree.body
                   if isinstance(node, ast.FunctionDef) and node.name == "pull_objects"]
    parameters = {arg.arg for node in definitions for arg in (*node.args.args, *node.args.kwonlyargs)}
    if not set(BACKOFF_KEYWORDS) <= parameters:
        return f"its inflatable_utils.pull_objects takes no `{'`/`'.join(BACKOFF_KEYWORDS)}`"
    return None


def loop_shape_problem(supernode_source: str, superexec_source: str, inflatable_source: str) -> str | None:
    """What differs from the Flower loop this module patches, or None when nothing does.

    `supernode_source` is flwr/supernode/start_client_internal.py, `superexec_source`
    flwr/supercore/superexec/run_superexec.py, `inflatable_source`
    flwr/supercore/inflatable/inflatable_utils.py.
    """
    found = sleep_calls(supernode_source)
    if sorted(found) != sorted(EXPECTED_SLEEPS):
        shown = ", ".join(f"{call} in {function}" for function, call in found) or "none"
        return f"its start_client_internal.py sleeps at {shown}"
    missing = [line for line in EXPECTED_SUPEREXEC_LINES if line not in superexec_source]
    if missing:
        return f"its run_superexec.py lacks `{missing[0]}`"
    return object_pull_problem(supernode_source, inflatable_source)


def check_flower_loop() -> None:
    """Raise RuntimeError, in one sentence naming the Flower version, unless the installed
    Flower's SuperNode loop still has the waits this module shortens."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode import start_client_internal

    problem = loop_shape_problem(*map(inspect.getsource, (start_client_internal, run_superexec, inflatable_utils)))
    if problem is not None:
        raise RuntimeError(
            f"fl-diloco supernode cannot shorten the poll of the installed Flower "
            f"{importlib.metadata.version('flwr')}: {problem}, unlike the Flower {PATCHED_FLOWER} loop it "
            f"was written for (fl_diloco/supernode.py); start plain flower-supernode instead")


class ShortWaitTime:
    """The `time` module as start_client_internal sees it: `sleep` of one of Flower's fixed
    waits lasts as long as `waits` says; everything else is the time module's."""

    def __init__(self, waits: dict[float, float]):
        self.waits = waits

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


def shorten_waits(poll_interval: float, supernode_module: ModuleType, environ: MutableMapping[str, str]) -> None:
    """Make the SuperNode loop in `supernode_module` and the SuperExec it will start (through
    `environ`, which its process inherits) wait at most `poll_interval` seconds, and its pull of
    a message's objects retry within tens of milliseconds (module docstring)."""
    supernode_module.time = ShortWaitTime({IDLE_POLL_S: poll_interval,
                                           REPLY_WAIT_S: min(REPLY_WAIT_S, poll_interval)})
    pull_objects_sooner(supernode_module)
    environ.setdefault(SUPEREXEC_POLL_ENV, str(min(SUPEREXEC_POLL_S, poll_interval)))


def main(argv: list[str]) -> int:
    """`fl-diloco supernode ...`: returns only when the SuperNode does (Ctrl-C, SIGTERM)."""
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        poll_interval, flower_args = split_poll_interval(argv)
        check_flower_loop()
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    shorten_waits(poll_interval, start_client_internal, os.environ)
    # flower_supernode parses sys.argv, as it does when started as `flower-supernode`.
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0
