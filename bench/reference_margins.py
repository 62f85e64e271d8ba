"""How far clean code and planted bugs land from the independent reference (CPU, ~2 minutes).

tests/test_reference.py asserts that every variant ends within the trajectory tolerance of the
reference (tests/tolerance.py) and that each planted bug misses it by at least 100 times. This
prints the figures behind those assertions, so that the margin on both sides can be read and
checked on any machine:

* for every reference variant, the clean code's relative error and how far inside the tolerance
  it is (infinite where the run matches bit for bit);
* for every planted bug, its relative error, in multiples of the tolerance, and the tensor
  that shows it most.

The LAST line of stdout is one JSON object with the figures.

Usage:
    python bench/reference_margins.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import test_reference as cases  # noqa: E402
from tests.in_process import run_in_process  # noqa: E402
from tests.reference import reference_run  # noqa: E402
from tests.tolerance import TRAJECTORY_RTOL, trajectory_error  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)  # as the test suite runs: the workers' own setting
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FL_DILOCO_CACHE", str(Path(tmp) / "cache"))
        os.environ.setdefault("FL_DILOCO_RUNTIME_DIR", str(Path(tmp) / "runtime"))
        references = {}

        def error(variant: str, run_dir: Path, patch=None, worker_keys=None) -> tuple[float, str]:
            cfg = cases._config(run_dir, variant)
            if variant not in references:
                references[variant] = reference_run(cases._config(Path(tmp) / f"ref-{variant}", variant))
            with mock.patch(*patch) if patch else mock.patch.dict({}):
                strategy, _ = run_in_process(cfg, worker_cfg=cfg.replace(**(worker_keys or {})))
            return trajectory_error(strategy.params, references[variant].global_params, cases._start(cfg))

        print(f"tolerance: relative error {TRAJECTORY_RTOL:g} per tensor (tests/tolerance.py)\n")
        print(f"{'clean variant':34s} {'rel. error':>11s}  inside by")
        clean = {}
        for variant in cases.VARIANTS:
            rel, _ = error(variant, Path(tmp) / variant)
            clean[variant] = rel
            inside = f"{TRAJECTORY_RTOL / rel:,.0f}x" if rel else "bit for bit"
            print(f"{variant:34s} {rel:11.3g}  {inside}", flush=True)

        print(f"\n{'planted bug':38s} {'rel. error':>11s}  {'x tolerance':>11s}  worst tensor")
        bugs = {}
        for bug, (variant, patch, worker_keys) in cases.PLANTED_BUGS.items():
            rel, name = error(variant, Path(tmp) / bug, patch, worker_keys)
            bugs[bug] = rel
            print(f"{bug:38s} {rel:11.3g}  {rel / TRAJECTORY_RTOL:11,.0f}  {name}", flush=True)

    print(json.dumps({"tolerance": TRAJECTORY_RTOL, "clean_relative_error": clean,
                      "planted_bug_relative_error": bugs,
                      "worst_clean_inside_by": TRAJECTORY_RTOL / max(max(clean.values()), 1e-30),
                      "mildest_bug_times_tolerance": min(bugs.values()) / TRAJECTORY_RTOL}))


if __name__ == "__main__":
    main()
