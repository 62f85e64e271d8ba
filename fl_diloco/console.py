"""What a run prints besides its own lines: nothing from the libraries it is built on that the
user cannot act on, no colour codes unless the output is a terminal, and a progress bar with
an ETA when it is.

Each piece of third-party noise is silenced by name (one warning, one log message, one kind
of progress bar), so a warning that means something still gets through.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

# Ray warns on every start that a future version will stop hiding GPUs from tasks that ask
# for none; fl-diloco hands the GPUs to its workers itself (clients.channel), either way.
RAY_ACCELERATOR_TIP = "Tip: In future versions of Ray, Ray will no longer override accelerator"
# Flower's Ray actors log this at WARNING each time a simulation ends normally.
ACTOR_SHUTDOWN_MESSAGE = "Manually terminating %s"


def quiet_third_party_output() -> None:
    """Silence, for this process and the processes it starts, the noise a run would print:
    Ray's accelerator tip, `datasets` progress bars (the run reports its own progress), and
    Flower's and Ray's colour codes when the output is not a terminal."""
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if not sys.stderr.isatty():
        from flwr.supercore.logger import update_console_handler

        update_console_handler(colored=False)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(ClientAppActor pid=...)" prefix
    quiet_actor_shutdown()


class _DropMessage(logging.Filter):
    def __init__(self, template: str) -> None:
        super().__init__()
        self.template = template

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.template


def quiet_actor_shutdown() -> None:
    """Drop Flower's routine actor-shutdown warning from this process's Flower log (once)."""
    from flwr.supercore.logger import FLOWER_LOGGER

    if not any(isinstance(f, _DropMessage) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_DropMessage(ACTOR_SHUTDOWN_MESSAGE))


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`: how long, to the precision a person plans with."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def round_progress_bar(total: int, initial: int, unit: str = "rounds") -> Any:
    """A progress bar with elapsed time and ETA, on a terminal only (None otherwise: the
    per-round lines carry the ETA there)."""
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stdout, dynamic_ncols=True, leave=False,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + unit + " [{elapsed}<{remaining}]")
