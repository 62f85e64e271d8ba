"""The implementation against an independent reference written straight from docs/algorithms.md
(tests/reference.py): same seeds, same data, parameters equal to 1e-5 after 4 outer steps.

Each variant is checked twice: through the strategy and workers driven in process (fast,
every variant), and through a real Flower simulation (Ray, worker processes, the ClientApp
adapter and the server's round pipeline), whose final checkpoint must match too.
"""

import pytest
import torch

from clients.worker import build_trainer
from fl_diloco.checkpoint import load_checkpoint
from fl_diloco.simulation import simulate
from tests.conftest import small_config
from tests.in_process import run_in_process
from tests.reference import reference_run

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
}
# The list; the last one above runs in process only.
FLOWER_VARIANTS = list(VARIANTS)[:-1]


def _config(tmp_path, variant):
    # 4 outer steps of H = 4 (8 rounds when streaming with P = 2), 2 workers.
    return small_config(tmp_path, rounds=4, inner_steps=4, eval_every=100, **VARIANTS[variant])


def _assert_matches(actual, expected):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


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
    _assert_matches(strategy.params, references(variant).global_params)
    start = build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()
    moved = max((strategy.params[n] - v).abs().max().item() for n, v in start.items())
    assert moved > 1e-3, "the run did not move the parameters: the comparison would be vacuous"


@pytest.mark.parametrize("variant", FLOWER_VARIANTS)
def test_flower_simulation_matches_reference(variant, tmp_path, references):
    cfg = _config(tmp_path, variant)
    summary = simulate(cfg)
    model, _ = load_checkpoint(summary["out_dir"] + "/checkpoint")
    _assert_matches({n: p.detach() for n, p in model.named_parameters()}, references(variant).global_params)
    assert summary["variant"] == cfg.variant_label
