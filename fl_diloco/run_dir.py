"""A run's output directory: which one it is, whether a run may write into it, and whose it is.

A directory holds one run, and a new run never destroys or mixes with another's data:

* `out_dir` unset: `./runs/<algorithm>-<timestamp>`, claimed with `mkdir` at once, so two runs
  started in the same second get `<timestamp>-2`, `-3`, ... instead of sharing one.
* `out_dir` set: the directory must not exist yet, or be unused: hold nothing but what a start
  that failed before training leaves behind (config.json, run.json, failed.json), which the new
  run replaces. Anything else, whether an earlier run or files of yours, and the run refuses to
  start, saying how to resume that run or choose another directory. `overwrite=true` deletes
  fl-diloco's own outputs there (RUN_OUTPUTS) first, and never touches any other file.
* `resume=DIR` writes into DIR, and only into the run that DIR holds: every run writes a random
  run id into DIR/run.json at its start and into each training checkpoint, and a resume refuses
  a checkpoint whose id is not the directory's (one copied from another run's directory, or a
  directory an older fl-diloco let two runs write into). Checkpoints from before run ids cannot
  be checked, and are taken as the directory's.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fl_diloco.checkpoint import CHECKPOINTS_DIR, CONFIG_NAME, CheckpointError, TrainingState
from fl_diloco.config import ConfigError
from fl_diloco.reporting import FAILED_NAME, METRICS_NAME, PLOT_NAME, SUMMARY_NAME
from fl_diloco.tracking import TENSORBOARD_DIR

RUN_NAME = "run.json"  # {"run_id": ...}: which run the directory holds
FINAL_CHECKPOINT_DIR = "checkpoint"
# All that a start which failed before its first round leaves: the directory counts as unused.
LEFT_BY_A_FAILED_START = frozenset({CONFIG_NAME, RUN_NAME, FAILED_NAME})
# What a run writes into its out_dir: what overwrite=true deletes.
RUN_OUTPUTS = (*sorted(LEFT_BY_A_FAILED_START), METRICS_NAME, SUMMARY_NAME, PLOT_NAME, CHECKPOINTS_DIR,
               FINAL_CHECKPOINT_DIR, TENSORBOARD_DIR)


def default_out_dir(algorithm: str) -> str:
    """./runs/<algorithm>-<timestamp>, absolute and created here, so no other run can take it:
    where a run writes when out_dir is unset."""
    base = Path.cwd() / "runs" / f"{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def check_out_dir(cfg: Any) -> None:
    """Raise ConfigError unless the run `cfg` starts may write into its out_dir (module
    docstring). A resume writes into the run it continues, which fl_diloco/resume.py checks."""
    if cfg.resume or not cfg.out_dir or cfg.overwrite:
        return
    out_dir = Path(cfg.out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} is a file, not a directory; choose another out_dir")
    found = sorted(p.name for p in out_dir.iterdir() if p.name not in LEFT_BY_A_FAILED_START)
    if not found:
        return
    ours = [name for name in found if name in RUN_OUTPUTS]
    held = (f"a run ({', '.join(ours)})" if ours
            else f"other files ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})")
    resume = f"continue that run with resume={out_dir}, " if (out_dir / CHECKPOINTS_DIR).is_dir() else ""
    raise ConfigError(f"out_dir={out_dir} already holds {held}; {resume}choose another out_dir (or leave "
                      f"it unset for a new directory under ./runs), or pass overwrite=true to delete "
                      f"fl-diloco's outputs there first")


def prepare_out_dir(cfg: Any) -> Path:
    """The run's output directory (absolute), checked (check_out_dir), emptied of an earlier
    run's outputs with overwrite=true, with the resolved config in config.json, the run id in
    run.json (kept by a resume) and no failed.json of an earlier start."""
    check_out_dir(cfg)
    out_dir = Path(cfg.out_dir or default_out_dir(cfg.algorithm))
    if cfg.overwrite:  # never with resume (RunConfig refuses the pair)
        for name in RUN_OUTPUTS:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2))
    if not (cfg.resume and read_run_id(out_dir)):
        (out_dir / RUN_NAME).write_text(json.dumps({"run_id": uuid.uuid4().hex}))
    (out_dir / FAILED_NAME).unlink(missing_ok=True)
    return out_dir.resolve()


def read_run_id(out_dir: str | Path) -> str | None:
    """The id of the run in `out_dir` (run.json), or None where there is none."""
    try:
        return str(json.loads((Path(out_dir) / RUN_NAME).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_same_run(run_dir: Path, state: TrainingState) -> None:
    """Raise CheckpointError if the checkpoint `state` was written by another run than the one
    `run_dir` holds (module docstring)."""
    written_by = state.meta.get("run_id")
    holds = read_run_id(run_dir)
    if written_by is not None and written_by != holds:
        raise CheckpointError(
            f"resume={run_dir}: checkpoint {state.path.name} was written by run {written_by}, but the "
            f"directory holds run {holds} ({RUN_NAME}); it mixes two runs, so there is no one run to "
            f"continue. Start a new run in another out_dir")
