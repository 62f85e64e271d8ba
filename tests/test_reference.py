"""The implementation against an independent reference written from docs/algorithms.md
(tests/reference.py): same seeds, same data, parameters equal to the trajectory tolerance of
tests/tolerance.py after 4 outer steps.

Each variant is checked twice: through the strategy and workers driven in process (fast,
every variant), and through a real Flower simulation (Ray, worker processes, the ClientApp
adapter and the server's round pipeline), whose final checkpoint must match too.

The comparison's power is tested as well: bugs planted in the worker (a flipped sign, eager's
own stale term kept, a delay off by one, τ a step early or late, α and 1 − α swapped) must miss
the reference by at least 100 times the tolerance.
"""

from unittest import mock

import pytest

import clients.fragment
import clients.worker
from clients.worker import build_trainer
from fl_diloco.checkpoint import load_checkpoint
from fl_diloco.simulation import simulate
from strategies.fragments import stale_round
from strategies.outer_optimizer import eager_outer_gradient, outer_gradient, zeros_like
from tests.conftest import small_config
from tests.in_process import run_in_process
from tests.reference import reference_run
from tests.tolerance import TRAJECTORY_RTOL, assert_same_trajectory, trajectory_error

# With P = 2, H = 6 gives H/P = 3 inner steps between syncs, room for τ = 2 (τ < H/P).
STREAMING_H6 = {"streaming": True, "fragments": 2, "inner_steps": 6}
VARIANTS = {
    "diloco": {},
    "delayed": {"algorithm": "delayed"},
    "eager-d1": {"algorithm": "eager", "delay": 1},
    "eager-d2": {"algorithm": "eager", "delay": 2},
    "streaming-tau0": {"streaming": True, "fragments": 2},
    "streaming-tau1-alpha0.5": {"streaming": True, "fragments": 2, "overlap_steps": 1, "mixing": 0.5},
    "streaming-eager": {"algorithm": "eager", "streaming": True, "fragments": 2},
    "streaming-sequential-eager-d2": {"algorithm": "eager", "delay": 2, "streaming": True,
                                      "fragments": 2, "fragment_pattern": "sequential"},
    # α ≠ 1/2, so that swapping α and 1 − α in the merge shows.
    "streaming-tau0-alpha0.3": {"streaming": True, "fragments": 2, "mixing": 0.3},
    "streaming-H6-tau1-alpha0.3": {**STREAMING_H6, "overlap_steps": 1, "mixing": 0.3},
    "streaming-H6-tau2": {**STREAMING_H6, "overlap_steps": 2},
}
# Real Flower runs for the first seven; the others differ only in the worker's own arithmetic,
# which the in-process runs already cover.
FLOWER_VARIANTS = list(VARIANTS)[:7]


def _config(tmp_path, variant):
    # 4 outer steps of H = 4 unless the variant says otherwise (8 rounds when streaming
    # with P = 2), 2 workers.
    return small_config(tmp_path, **{"rounds": 4, "inner_steps": 4, "eval_every": 100, **VARIANTS[variant]})


def _start(cfg):
    return build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = reference_run(_config(tmp_path_factory.mktemp(variant), variant))
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_process_matches_reference(variant, tmp_path, references):
    cfg = _config(tmp_path, variant)
    strategy, _ = run_in_process(cfg)
    assert_same_trajectory(strategy.params, references(variant).global_params, _start(cfg))


@pytest.mark.parametrize("variant", FLOWER_VARIANTS)
def test_flower_simulation_matches_reference(variant, tmp_path, references):
    cfg = _config(tmp_path, variant)
    summary = simulate(cfg)
    model, _ = load_checkpoint(summary["out_dir"] + "/checkpoint")
    assert_same_trajectory({n: p.detach() for n, p in model.named_parameters()},
                           references(variant).global_params, _start(cfg))
    assert summary["variant"] == cfg.variant_label


# ----- the comparison's power: planted bugs must miss the reference by far -----

def _flipped_sign(start, end):
    return outer_gradient(end, start)


def _own_stale_term_kept(stale_average, fresh_own, stale_own, weight):
    return eager_outer_gradient(stale_average, fresh_own, zeros_like(stale_own), weight)


PLANTED_BUGS = {
    # name: (variant, patch of the worker's code or None, wrong keys the workers get instead)
    "flipped-outer-gradient-sign": ("diloco", ("clients.fragment.outer_gradient", _flipped_sign), {}),
    "eager-keeps-own-stale-term": ("eager-d1", ("clients.fragment.eager_outer_gradient", _own_stale_term_kept), {}),
    "streaming-eager-keeps-own-stale-term": ("streaming-eager", ("clients.fragment.eager_outer_gradient",
                                                                  _own_stale_term_kept), {}),
    "eager-d2-uses-the-d1-average": ("eager-d2", ("clients.worker.stale_round",
                                                  lambda r, d, p: stale_round(r, d, p) + p), {}),
    "delayed-one-round-too-stale": ("delayed", ("clients.worker.stale_round",
                                                lambda r, d, p: stale_round(r, d, p) - 1), {}),
    "tau-one-step-late": ("streaming-H6-tau1-alpha0.3", None, {"overlap_steps": 2}),
    "tau-one-step-early": ("streaming-H6-tau1-alpha0.3", None, {"overlap_steps": 0}),
    "tau2-one-step-early": ("streaming-H6-tau2", None, {"overlap_steps": 1}),
    "alpha-swapped": ("streaming-H6-tau1-alpha0.3", None, {"mixing": 0.7}),
}


@pytest.mark.parametrize("bug", PLANTED_BUGS)
def test_planted_bugs_miss_the_reference_by_far(bug, tmp_path, references):
    variant, patch, worker_keys = PLANTED_BUGS[bug]
    cfg = _config(tmp_path, variant)
    with mock.patch(patch[0], patch[1]) if patch else mock.patch.dict({}):
        strategy, _ = run_in_process(cfg, worker_cfg=cfg.replace(**worker_keys))
    error, name = trajectory_error(strategy.params, references(variant).global_params, _start(cfg))
    assert error >= 100 * TRAJECTORY_RTOL, f"{bug}: {name} off by only {error:.3g}"


def test_planted_bugs_patch_code_that_exists():
    # A renamed function would make mock.patch create a new attribute and plant nothing.
    for _, patch, _ in PLANTED_BUGS.values():
        if patch:
            module, attribute = patch[0].rsplit(".", 1)
            assert hasattr({"clients.fragment": clients.fragment, "clients.worker": clients.worker}[module],
                           attribute), patch[0]
