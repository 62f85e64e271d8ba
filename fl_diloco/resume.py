"""Resuming a run: which checkpoint, which config, and whether anything is left to train.

`resume=DIR` continues the run in DIR from its newest training checkpoint
(fl_diloco/checkpoint.py), with the config that checkpoint was written under. Three cases:

* The run was stopped: it goes on to its `rounds`, exactly as if never stopped (`diloco`
  and `delayed`; see README "Faults, checkpoints and resume").
* The run is complete (its summary.json covers its `rounds`): nothing is started; the run's
  summary is returned as it is and one sentence says how to train on.
* `rounds=N` with N above the run's rounds extends it, from its newest checkpoint (every run
  checkpoints its final round, so a finished run extends from where it ended). The
  learning-rate schedule is NOT re-planned: warmup + cosine still spans the original rounds
  (`lr_schedule_rounds` keeps them), so every step the original run took keeps the LR it was
  trained with, and the extra steps run at the floor, inner_lr × min_lr_ratio, where the
  cosine ended. Re-planning the cosine over N rounds would make the finished steps belong to
  a schedule they were not trained under, and restarting it would jump the LR back up. The
  workers start the extension with fresh AdamW moments: a node deletes its saved moments when
  a run ends.

A key a launch leaves at its default takes the checkpoint's value: `flwr run --run-config
"resume='...'"` and Hydra fill every key, so a default cannot be told from a key left out.
`explicit_keys` names the keys the launch set itself (`fl-diloco train` knows them from the
command line), so `rounds=20` there extends a 10-round run even though 20 is the default; under
`flwr run`, pass a `rounds` other than the default or extend with `fl-diloco train`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fl_diloco.checkpoint import (CONFIG_NAME, CheckpointError, TrainingState, load_training_checkpoint,
                                  training_checkpoints)
from fl_diloco.config import DEFAULTS, RunConfig
from fl_diloco.reporting import SUMMARY_NAME
from fl_diloco.run_dir import check_same_run

# Keys a resumed run may set differently from the run it continues: where and how it runs,
# not what it computes. (`rounds` may grow: that extends the run, see the module docstring.)
RESUMABLE_CHANGES = ("resume", "out_dir", "overwrite", "device", "threads_per_worker", "server_threads",
                     "round_timeout", "startup_timeout", "node_wait_timeout", "worker_idle_timeout",
                     "eval_every", "eval_sequences", "checkpoint_every", "keep_checkpoints", "tensorboard",
                     "peak_flops")


def load_resume(cfg: RunConfig, explicit_keys: Collection[str] = ()) -> tuple[RunConfig, TrainingState]:
    """The config and newest training checkpoint of the run `cfg.resume` names; a
    CheckpointError (a ConfigError) says in one sentence why there is nothing to resume, or
    why that checkpoint is not the directory's run (fl_diloco/run_dir.py)."""
    run_dir = Path(cfg.resume)
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={cfg.resume}: no such directory")
    if not training_checkpoints(run_dir):
        raise CheckpointError(why_no_checkpoint(run_dir))
    state = load_training_checkpoint(run_dir)
    check_same_run(run_dir, state)
    return resume_config(cfg, state, explicit_keys), state


def why_no_checkpoint(run_dir: Path) -> str:
    """The sentence that says why a run directory holds no training checkpoint."""
    try:
        saved = json.loads((run_dir / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return f"resume={run_dir}: not an fl-diloco run directory (no readable {CONFIG_NAME})"
    if saved.get("algorithm") == "dp":
        return (f"run {run_dir} is the data-parallel baseline (algorithm=dp), which writes no "
                f"resumable checkpoint; start it again")
    if (run_dir / SUMMARY_NAME).is_file():
        return (f"run {run_dir} finished without a training checkpoint (an older fl-diloco wrote "
                f"none for its final round); it cannot be continued, start a new run")
    every = saved.get("checkpoint_every")
    return (f"run {run_dir} stopped before its first checkpoint (checkpoint_every={every}); "
            f"nothing to resume, start it again")


def resume_config(cfg: RunConfig, resumed: TrainingState, explicit_keys: Collection[str] = ()) -> RunConfig:
    """The config of a resumed run: the checkpoint's, with the changes this launch asked for.

    A key set to something else must be one that does not change what is computed
    (RESUMABLE_CHANGES), or `rounds` raised to extend the run. A key left at its default
    takes the checkpoint's value unless it is in `explicit_keys` (module docstring).
    """
    saved = json.loads((resumed.path / CONFIG_NAME).read_text())["run_config"]
    values = dict(saved)

    def given(key: str) -> bool:
        value = getattr(cfg, key)
        return value != values.get(key, DEFAULTS[key]) and (value != DEFAULTS[key] or key in explicit_keys)

    if given("rounds"):
        if cfg.rounds < saved["rounds"]:
            raise CheckpointError(f"resume={cfg.resume}: rounds={cfg.rounds} is fewer than the run's "
                                  f"{saved['rounds']}; a resumed run can only be extended")
        # The schedule stays the one the run was planned with (module docstring).
        values.update(rounds=cfg.rounds, lr_schedule_rounds=saved.get("lr_schedule_rounds") or saved["rounds"])
    conflicts = [f"{key}={getattr(cfg, key)!r} (the checkpoint has {values.get(key)!r})"
                 for key in RunConfig.keys() if given(key) and key not in RESUMABLE_CHANGES]
    if conflicts:
        raise CheckpointError(f"resume={cfg.resume}: {', '.join(conflicts)}. A resumed run must compute "
                              f"what the original run did; leave these keys out")
    values.update({key: getattr(cfg, key) for key in RESUMABLE_CHANGES if given(key)})
    if cfg.out_dir and os.path.realpath(cfg.out_dir) != os.path.realpath(cfg.resume):
        raise CheckpointError(f"resume={cfg.resume} continues that run in its own directory; "
                              f"leave out_dir unset or equal to it (got out_dir={cfg.out_dir})")
    # The run the original overwrote, if any, is gone; this one must not delete its own.
    values.update(resume=cfg.resume, out_dir=cfg.resume, overwrite=False)
    return RunConfig.from_mapping(values)


def finished_summary(cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of the run a resolved resume config continues, if that run already trained
    `cfg.rounds` (then there is nothing to do); else None."""
    try:
        summary = json.loads((Path(cfg.resume) / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None  # never finished, or died writing it: the resume (re)writes it
    return summary if summary.get("rounds") == cfg.rounds else None


def complete_message(cfg: RunConfig) -> str:
    return (f"run {cfg.resume} is complete ({cfg.rounds} of {cfg.rounds} rounds); to train on, "
            f"pass rounds=N with N > {cfg.rounds}")
