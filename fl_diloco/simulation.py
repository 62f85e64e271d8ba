"""Run one Flower simulation in this process (what `fl-diloco train` does).

The ServerApp and ClientApp are the same ones `flwr run .` loads; only the run config
reaches them differently (baked into the apps, since Flower's Python simulation API takes
no run config).

Flower 1.41 marks that API (`flwr.simulation.run_simulation`) deprecated without an
in-process successor; the README ("Running with `flwr run`") says why we keep it. `simulate`
is its only caller, and hides its deprecation banner.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clients.channel import VISIBLE_GPUS_ENV
from fl_diloco.client_app import make_client_app
from fl_diloco.config import RunConfig
from fl_diloco.reporting import FAILED_NAME, SUMMARY_NAME
from fl_diloco.resume import complete_message, finished_summary, load_resume
from fl_diloco.run_dir import default_out_dir
from fl_diloco.server_app import make_server_app


@contextmanager
def _without_run_simulation_deprecation_banner() -> Iterator[None]:
    """Drop the one warning Flower logs on every `run_simulation` call; all others pass."""
    from flwr.supercore.logger import FLOWER_LOGGER

    def not_the_banner(record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()

    FLOWER_LOGGER.addFilter(not_the_banner)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(not_the_banner)


def simulate(cfg: RunConfig, explicit_keys: Collection[str] = ()) -> dict[str, Any]:
    """Train `cfg` with `num_clients` simulated SuperNodes; returns summary.json's content.

    `explicit_keys`: the keys the user set (fl_diloco/resume.py); they matter to a resume only.
    A resume of a run that is already complete says so and returns its summary, starting nothing.
    """
    from flwr.simulation import run_simulation

    if cfg.resume:  # the checkpoint's config says how many SuperNodes to simulate
        cfg, _ = load_resume(cfg, explicit_keys)
        if (summary := finished_summary(cfg)) is not None:
            print(complete_message(cfg), flush=True)
            return summary
    if not cfg.out_dir:
        cfg = cfg.replace(out_dir=default_out_dir(cfg.algorithm))
    # Remember which GPUs exist before Ray hides them from the (GPU-less) ClientApps; the
    # workers they start get them back (see clients.channel).
    os.environ.setdefault(VISIBLE_GPUS_ENV, os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    overrides = cfg.to_dict()
    with _without_run_simulation_deprecation_banner():
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=make_client_app(overrides),
            num_supernodes=cfg.num_clients,
            backend_config={
                # The adapters only wait on their workers, so all M run at once; the workers
                # share the real cores (see clients.worker.worker_threads).
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": max(cfg.num_clients, os.cpu_count() or 1),
                              "logging_level": "ERROR", "log_to_driver": True},
            },
        )
    summary_path = Path(cfg.out_dir) / SUMMARY_NAME
    if not summary_path.exists():
        # Flower logs the ServerApp's exception and returns; the server left why in failed.json.
        failed = Path(cfg.out_dir) / FAILED_NAME
        why = json.loads(failed.read_text())["error"] if failed.exists() else "see the log above"
        raise RuntimeError(f"the simulation ended without writing {summary_path}: {why}")
    return json.loads(summary_path.read_text())
