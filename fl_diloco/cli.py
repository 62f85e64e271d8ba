"""`fl-diloco` command line: `train`, `report`, `plan`, `export` and `supernode`.

`train` composes the Hydra config in conf/ with the overrides and runs one job: a Flower
simulation in this process for the DiLoCo algorithms, or the single-process data-parallel
baseline for `algorithm=dp`. With `-m` (Hydra's multirun) it runs one job per combination of
the swept values, one after another, each into its own directory of a sweep directory; a job
that fails is recorded in `failed.json` and the sweep goes on. `report` aggregates a sweep
(fl_diloco/report.py), `plan` is the compute-utilization planner (fl_diloco/planner.py) and
`export` writes a checkpoint as a Hugging Face Llama model (fl_diloco/export.py). `supernode` is
Flower's SuperNode with a shorter poll (fl_diloco/supernode.py).
"""

from __future__ import annotations

import difflib
import os
import socket
import sys
import textwrap
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fl_diloco.config import DEFAULTS, ConfigError, RunConfig, key_help
from fl_diloco.report import save_sweep_index
from fl_diloco.reporting import write_failure

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Keys whose values are paths: never part of a job directory's name.
PATH_KEYS = ("out_dir", "resume", "data_source")

USAGE = """usage: fl-diloco train [-m] [GROUP=OPTION ...] [KEY=VALUE ...]
       fl-diloco report SWEEP_DIR [--baseline KEY=VALUE,...] [--out DIR]
       fl-diloco plan [--help | FLAGS]                 compute utilization against bandwidth
       fl-diloco export CHECKPOINT OUT_DIR [--overwrite]   as a Hugging Face Llama model
       fl-diloco supernode [--poll-interval S] ARGS    flower-supernode ARGS, polling every S s

  Run one training job with the config in conf/ plus overrides, e.g.
    fl-diloco train algorithm=diloco model=tiny num_clients=4 inner_steps=30 rounds=20
    fl-diloco train algorithm=dp rounds=20          # data-parallel baseline, same token budget
    fl-diloco train algorithm=eager delay=1         # eager updates, 1 outer step of overlap
    fl-diloco train streaming=true fragments=2 overlap_steps=1 wire_precision=fp4

  Sweep with -m (--multirun): one job per combination, run one after another into
  ./runs/sweep-<timestamp>/<job>-<swept values>/ (or hydra.sweep.dir=/abs/path), then report:
    fl-diloco train -m algorithm=diloco,eager inner_steps=30,100 seed=0,1
    fl-diloco report runs/sweep-<timestamp> --baseline algorithm=diloco

  Groups (GROUP=OPTION sets several keys at once; a KEY=VALUE given too wins):
{groups}
  Keys: {keys}
  `fl-diloco train --help` says what each key means, its default and its allowed values.
"""


def config_groups() -> dict[str, list[str]]:
    """Each config group under conf/ and its options, e.g. {'wire': ['bf16', 'fp32', ...]}."""
    return {group.name: sorted(option.stem for option in group.glob("*.yaml"))
            for group in sorted(CONF_DIR.iterdir()) if group.is_dir()}


def usage() -> str:
    groups = "\n".join(f"    {name}: {', '.join(options)}" for name, options in config_groups().items())
    return USAGE.format(groups=groups, keys=", ".join(RunConfig.keys()))


def train_help() -> str:
    """`fl-diloco train --help`: the usage, then every RunConfig key with its default, allowed
    values and meaning (fl_diloco/config.py: RunConfig and key_help)."""
    described = key_help()
    lines = [usage(), "Every key, as KEY=DEFAULT, with the values it allows and what it means:", ""]
    for key in RunConfig.keys():
        meaning, allowed = described[key]
        default = DEFAULTS[key]
        shown = str(default).lower() if isinstance(default, bool) else (default if default != "" else '""')
        lines.append(f"  {f'{key}={shown}':<34} allowed: {allowed}")
        lines.extend(textwrap.wrap(meaning, width=96, initial_indent="      ", subsequent_indent="      "))
    lines += ["", "The algorithms and their formulas: docs/algorithms.md."]
    return "\n".join(lines)


def check_overrides(overrides: list[str]) -> None:
    """Fail before Hydra starts on a key that RunConfig does not have or a group option that
    does not exist, naming the nearest one. Sweep values (`a,b`) are checked one by one."""
    keys = RunConfig.keys()
    groups = config_groups()
    for item in overrides:
        if item.startswith(("hydra.", "hydra/", "-")) or "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("+~")
        if key in groups:
            for option in _plain_values(item):
                if option not in groups[key]:
                    close = difflib.get_close_matches(option, groups[key], n=1)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise ConfigError(f"{key}={option} is not an option of the '{key}' group.{hint} "
                                      f"Options: {', '.join(groups[key])}")
        elif key not in keys:
            close = difflib.get_close_matches(key, [*keys, *groups], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'.{hint} Run `fl-diloco train --help` for the list.")


def _plain_values(override: str) -> list[str]:
    """The values of `key=a` or `key=a,b` as strings; [] for what Hydra must judge itself
    (sweep functions like range(...), or a malformed override that Hydra will report)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors, with context
        return []
    if isinstance(value, ChoiceSweep) and value.simple_form:
        return [str(v) for v in value.list]
    return [value] if isinstance(value, str) else []


def run_job(cfg: RunConfig, explicit_keys: Collection[str] = ()) -> dict:
    """Run one job; `explicit_keys` are the config keys the command line set (for a resume)."""
    from fl_diloco.console import quiet_third_party_output
    from fl_diloco.preflight import check_before_start

    # Before anything starts or any directory is made; the workers all run on this machine
    # (the data-parallel baseline trains one model).
    check_before_start(cfg, workers_here=1 if cfg.algorithm == "dp" else cfg.num_clients)
    quiet_third_party_output()
    if cfg.algorithm == "dp":
        from fl_diloco.dp_baseline import train_data_parallel

        return train_data_parallel(cfg)
    from fl_diloco.simulation import simulate

    return simulate(cfg, explicit_keys)


# --------------------------------------------------------------------------------------
# Sweeps (`train -m`)


def is_multirun(overrides: list[str]) -> bool:
    return any(item in ("-m", "--multirun") or item.replace(" ", "") == "hydra.mode=MULTIRUN"
               for item in overrides)


def name_jobs_by_swept_keys(overrides: list[str]) -> list[str]:
    """Hydra names each job's directory after all its overrides; keep only the swept ones,
    so `-m algorithm=diloco,eager seed=0,1 rounds=2` gives `0-algorithm=diloco,seed=0`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(item.startswith(("hydra.job.config.override_dirname", "hydra.sweep.subdir"))
           for item in overrides):
        return overrides  # the user chose the naming
    task = [item for item in overrides if "=" in item and not item.startswith(("-", "hydra.", "hydra/"))]
    parsed = OverridesParser.create().parse_overrides(task)
    unswept = {o.key_or_group for o in parsed if not o.is_sweep_override()} | set(PATH_KEYS)
    return [*overrides, f"hydra.job.config.override_dirname.exclude_keys=[{','.join(sorted(unswept))}]"]


def run_sweep_job(values: dict[str, Any], job_dir: Path, num: int, overrides: list[str],
                  earlier_out_dirs: list[str]) -> dict[str, Any]:
    """Run one job of a sweep. Returns the fields of its sweep.json entry that the run decides:
    status, final_eval_loss or error, seconds. A failure is recorded, not raised, so the next
    job runs; only an interruption (KeyboardInterrupt, SystemExit) propagates.

    The job writes into `values["out_dir"]` (its job directory unless the user named one);
    a failure leaves failed.json (config, error, traceback) in the job directory.
    """
    print(f"\n== sweep job #{num}: {' '.join(overrides) or '(defaults)'} -> {values['out_dir']}", flush=True)
    began = time.perf_counter()
    try:
        if values["out_dir"] in earlier_out_dirs:
            raise ConfigError(f"out_dir={values['out_dir']} is an earlier job's too, and this job would "
                              f"overwrite its results; leave out_dir unset in a sweep (each job "
                              f"writes into its own directory) or sweep it too")
        summary = run_job(RunConfig.from_mapping(values))
        outcome: dict[str, Any] = {"status": "completed", "final_eval_loss": summary.get("final_eval_loss")}
    except Exception as err:  # noqa: BLE001 - one broken job must not end the sweep
        # (Ctrl-C, and SIGTERM, which Ray turns into SystemExit, still end it: see _hydra_train.)
        error = f"{type(err).__name__}: {err}"
        outcome = {"status": "failed", "error": error}
        failed = write_failure(job_dir, err, overrides=overrides, config=values)
        print(f"== sweep job #{num} FAILED: {error}\n   details in {failed}; "
              f"going on with the next job", file=sys.stderr, flush=True)
    return {**outcome, "seconds": round(time.perf_counter() - began, 1)}


def write_sweep_index(sweep_dir: Path, command: list[str], jobs: list[dict[str, Any]]) -> Path:
    """sweep.json: every job so far with its overrides, status and out_dir (rewritten as each
    job starts and ends, so an interrupted sweep still says what it did). Paths inside the sweep are
    written relative to it, so that a sweep directory can be moved and still be reported on."""

    def relative(path: str) -> str:
        return str(Path(path).relative_to(sweep_dir)) if Path(path).is_relative_to(sweep_dir) else path

    # pid and host let `fl-diloco report` tell a job that is still running from one whose
    # sweep was killed (SIGKILL leaves it `running` here).
    index = {"command": " ".join(["fl-diloco", "train", *command]), "sweep_dir": str(sweep_dir),
             "pid": os.getpid(), "host": socket.gethostname(),
             "jobs": [{**job, "job_dir": relative(job["job_dir"]), "out_dir": relative(job["out_dir"])}
                      for job in jobs]}
    return save_sweep_index(sweep_dir, index)


def print_sweep_status(sweep_dir: Path, jobs: list[dict[str, Any]]) -> None:
    failed = sum(job["status"] != "completed" for job in jobs)
    print(f"\nsweep {sweep_dir}: {len(jobs)} jobs, {len(jobs) - failed} completed, {failed} failed")
    for job in jobs:
        if job["status"] == "completed":
            loss = job.get("final_eval_loss")
            outcome = "eval loss " + ("-" if loss is None else f"{loss:.4f}")
        else:
            outcome = job.get("error", job["status"]).splitlines()[0][:120]
        print(f"  #{job['num']:<3} {job['status']:<9} {Path(job['job_dir']).name:<40} {outcome}")
    print(f"report: fl-diloco report {sweep_dir}", flush=True)


def _hydra_train(overrides: list[str], command: list[str]) -> list[dict[str, Any]]:
    """Run Hydra's app on `overrides`; returns the sweep's job entries ([] for a single run).
    `command` is what the user typed, for sweep.json. A single run's ConfigError is raised
    after Hydra returns, so that main prints it as one line instead of Hydra's traceback."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    jobs: list[dict[str, Any]] = []
    sweep_dirs: list[Path] = []
    config_errors: list[ConfigError] = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def train(dict_config: DictConfig) -> None:
        values = OmegaConf.to_container(dict_config, resolve=True)
        hydra_config = HydraConfig.get()
        if hydra_config.mode != RunMode.MULTIRUN:
            try:
                run_job(RunConfig.from_mapping(values),
                        explicit_keys={item.split("=", 1)[0].lstrip("+~") for item in hydra_config.overrides.task})
            except ConfigError as err:
                config_errors.append(err)
            return
        sweep_dirs.append(Path(hydra_config.sweep.dir).resolve())
        job_dir = Path(hydra_config.runtime.output_dir)
        values["out_dir"] = values["out_dir"] or str(job_dir)
        earlier_out_dirs = [job["out_dir"] for job in jobs]
        entry = {"num": hydra_config.job.num, "overrides": list(hydra_config.overrides.task),
                 "job_dir": str(job_dir), "out_dir": values["out_dir"], "status": "running"}
        jobs.append(entry)
        write_sweep_index(sweep_dirs[0], command, jobs)
        try:
            entry.update(run_sweep_job(values, job_dir, entry["num"], entry["overrides"], earlier_out_dirs))
        except BaseException:  # interrupted: the sweep stops here, and sweep.json says so
            entry["status"] = "interrupted"
            raise
        finally:
            write_sweep_index(sweep_dirs[0], command, jobs)

    saved_argv = sys.argv
    sys.argv = [f"{sys.argv[0]} train", *overrides]
    try:
        train()
    finally:
        sys.argv = saved_argv
    if config_errors:
        raise config_errors[0]
    if jobs:
        print_sweep_status(sweep_dirs[0], jobs)
    return jobs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    # `python -m fl_diloco.main KEY=VALUE ...` means train.
    command, rest = ("train", argv) if "=" in argv[0] or argv[0] in ("-m", "--multirun") else (argv[0], argv[1:])
    if command == "plan":
        from fl_diloco.planner import main as plan_main

        return plan_main(rest)
    if command == "export":
        from fl_diloco.export import main as export_main

        return export_main(rest)
    if command == "supernode":
        from fl_diloco.supernode import main as supernode_main

        return supernode_main(rest)
    if command == "report":
        from fl_diloco.report import main as report_main

        return report_main(rest)
    if command != "train":
        print(f"unknown command '{command}'\n\n" + usage(), file=sys.stderr)
        return 2
    if any(item in ("-h", "--help") for item in rest):  # ours, not Hydra's stock page
        print(train_help())
        return 0
    try:
        check_overrides(rest)
        jobs = _hydra_train(name_jobs_by_swept_keys(rest) if is_multirun(rest) else rest, command=rest)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A sweep runs every job, then says by its exit status whether all of them worked.
    return 1 if any(job["status"] != "completed" for job in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
