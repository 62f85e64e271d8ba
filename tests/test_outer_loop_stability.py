"""The linearised outer loop (strategies/outer_loop_stability.py) against closed forms."""

import numpy as np
import pytest

from strategies.outer_loop_stability import largest_stable_fraction, spectral_radius, transition_matrix


def largest_root(*coefficients: float) -> float:
    return float(np.max(np.abs(np.roots(coefficients))))


@pytest.mark.parametrize("c", [0.05, 0.3, 0.8])
@pytest.mark.parametrize("lr", [0.7, 1.5])
def test_plain_sgd_outer_loops_match_their_characteristic_polynomials(c, lr):
    # With μ = 0 each loop is a short linear recurrence in θ, solved by hand:
    #   diloco   θ(t) = θ(t−1) − ηc·θ(t−1)                     → z − (1 − ηc)
    #   delayed  θ(t) = θ(t−1) − ηc·θ(t−2)                     → z² − z + ηc
    #   eager    θ(t) = θ(t−1) − ηc·(θ(t−1) + θ(t−2))/2 (M=2)  → z² − (1 − ηc/2)·z + ηc/2
    k = lr * c
    assert spectral_radius("diloco", c, lr, 0.0) == pytest.approx(abs(1 - k), abs=1e-12)
    assert spectral_radius("delayed", c, lr, 0.0) == pytest.approx(largest_root(1, -1, k), abs=1e-6)
    assert spectral_radius("eager", c, lr, 0.0, num_workers=2) == pytest.approx(
        largest_root(1, -(1 - k / 2), k / 2), abs=1e-6)


def test_one_worker_eager_is_diloco():
    for c in (0.1, 0.5, 0.9):
        eager = spectral_radius("eager", c, 0.7, 0.9, num_workers=1)
        assert eager == pytest.approx(spectral_radius("diloco", c, 0.7, 0.9), abs=1e-6)


def test_known_thresholds_at_the_default_outer_optimizer():
    # DiLoCo's loop never diverges at η = 0.7, μ = 0.9; with M = 4, eager does past c ≈ 0.59
    # and naive delayed past c ≈ 0.36 (an independent derivation found the same numbers).
    assert largest_stable_fraction("diloco", 0.7, 0.9, num_workers=4) == 1.0
    assert largest_stable_fraction("eager", 0.7, 0.9, num_workers=4) == pytest.approx(0.594, abs=2e-3)
    assert largest_stable_fraction("delayed", 0.7, 0.9, num_workers=4) == pytest.approx(0.361, abs=2e-3)
    # Halving the outer LR makes eager stable at every c.
    assert largest_stable_fraction("eager", 0.35, 0.9, num_workers=4) == 1.0


def test_the_state_carries_the_history_the_delay_needs():
    assert transition_matrix("diloco", 0.2, 0.7, 0.9).shape == (2, 2)
    assert transition_matrix("eager", 0.2, 0.7, 0.9, delay=2).shape == (4, 4)
    with pytest.raises(ValueError, match="variant must be one of"):
        transition_matrix("fedavg", 0.2, 0.7, 0.9)
