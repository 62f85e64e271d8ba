"""`fl-diloco` command line: `train`, `plan` and `export`.

`train` composes the Hydra config in conf/ with the overrides and runs one job: a Flower
simulation in this process for the DiLoCo algorithms, or the single-process data-parallel
baseline for `algorithm=dp`. `plan` is the compute-utilization planner (fl_diloco/planner.py)
and `export` writes a checkpoint as a Hugging Face Llama model (fl_diloco/export.py).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from fl_diloco.config import ConfigError, RunConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

USAGE = """usage: fl-diloco train [KEY=VALUE ...]
       fl-diloco plan [--help | FLAGS]                 compute utilization against bandwidth
       fl-diloco export CHECKPOINT OUT_DIR [--overwrite]   as a Hugging Face Llama model

  Run one training job with the config in conf/ plus overrides, e.g.
    fl-diloco train algorithm=diloco model=tiny num_clients=4 inner_steps=30 rounds=20
    fl-diloco train algorithm=dp rounds=20          # data-parallel baseline, same token budget
    fl-diloco train algorithm=eager delay=1         # eager updates, 1 outer step of overlap
    fl-diloco train streaming=true fragments=2 overlap_steps=1 wire_precision=fp4

  Keys: {keys}
"""


def check_overrides(overrides: list[str]) -> None:
    """Fail before Hydra starts on a key that RunConfig does not have, naming the nearest one."""
    keys = RunConfig.keys()
    for item in overrides:
        if item.startswith(("hydra.", "hydra/", "-")) or "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("+~")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'.{hint} Run `fl-diloco --help` for the list.")


def run_job(cfg: RunConfig) -> dict:
    if cfg.algorithm == "dp":
        from fl_diloco.dp_baseline import train_data_parallel

        return train_data_parallel(cfg)
    from fl_diloco.simulation import simulate

    return simulate(cfg)


def _hydra_train() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def train(dict_config: DictConfig) -> None:
        run_job(RunConfig.from_mapping(OmegaConf.to_container(dict_config, resolve=True)))

    train()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(keys=", ".join(RunConfig.keys())))
        return 0
    # `python -m fl_diloco.main KEY=VALUE ...` means train.
    command, rest = ("train", argv) if "=" in argv[0] else (argv[0], argv[1:])
    if command == "plan":
        from fl_diloco.planner import main as plan_main

        return plan_main(rest)
    if command == "export":
        from fl_diloco.export import main as export_main

        return export_main(rest)
    if command != "train":
        print(f"unknown command '{command}'\n\n" + USAGE.format(keys=", ".join(RunConfig.keys())),
              file=sys.stderr)
        return 2
    try:
        check_overrides(rest)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.argv = [f"{sys.argv[0]} train", *rest]
    _hydra_train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
