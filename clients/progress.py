"""Inner-step progress that a worker publishes for a progress bar on its own machine.

The server hears from a worker once per round, and a round of a large model can take minutes.
So each worker writes its inner step, at most once a second, into its node-local state folder
(clients.worker.optimizer_state_dir). Where the server shares the machine with its workers (a
simulation, a local deployment) its progress bar reads these files and moves within a round;
across sites the files are on other machines, and the bar moves once per round.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

from fl_diloco.atomic import atomic_write

PROGRESS_NAME = "inner_step"


class ProgressPublisher:
    """Writes the worker's inner step into `directory`, at most once per `interval` seconds."""

    def __init__(self, directory: Path, interval: float = 1.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / PROGRESS_NAME
        self.interval = interval
        self.last_written = -float("inf")

    def publish(self, step: int) -> None:
        now = time.monotonic()
        if now - self.last_written < self.interval:
            return
        self.last_written = now
        # Only a display depends on it: a folder removed at shutdown must not stop training.
        with contextlib.suppress(OSError):
            atomic_write(self.path, lambda f: f.write(str(step).encode()), durable=False)


def slowest_step(directories: Iterable[Path]) -> int | None:
    """The smallest inner step the workers published, or None unless every one has published:
    a round closes only when its slowest worker gets there."""
    steps = []
    for directory in directories:
        try:
            steps.append(int((directory / PROGRESS_NAME).read_text()))
        except (OSError, ValueError):
            return None
    return min(steps) if steps else None
