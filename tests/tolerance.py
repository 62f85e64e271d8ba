"""How close two training trajectories must be to count as the same: one rule for every test
that compares parameters after inner AdamW steps.

The rule, per tensor:   ‖θ_actual − θ_expected‖₂  ≤  TRAJECTORY_RTOL · ‖θ_expected − θ_start‖₂

Why a norm relative to how far the run moved the tensor, and not an elementwise `atol`:

* Two correct implementations that add the same numbers in a different order (the eager mix
  Δ(t−d) + w·(Δ_m(t) − Δ_m(t−d)) against its definitional sum) differ by an ulp or two. That
  much is the same everywhere.
* AdamW then amplifies it unevenly. Its step is lr·m/√v elementwise, so on a parameter whose
  gradient is ~0 (the embedding row of a token that was not in the batch) a one-ulp difference
  in m can become a step of a sizeable fraction of lr. A handful of the 524,288 embedding
  values end 1e-5 to 2e-5 apart while every other value agrees to 1e-8. Which elements, and by
  how much, depends on the CPU: matmul kernels sum in a different order on AVX2 and AVX-512,
  so the trajectories themselves differ in their last bits. An elementwise bound of 1e-5
  passed on one Xeon and failed on an EPYC.
* A real bug moves every element of the tensors it touches: measured on this suite's 4-outer-step
  runs, the planted bugs in tests/test_reference.py (flipped sign, eager's own stale term kept,
  a delay off by one, τ a step early or late, α and 1 − α swapped) give relative errors of
  0.048 to 2, while clean code stays below 6.2e-6 (worst case: streaming eager with d = 2; the
  variants without eager match bit for bit).

3e-4 leaves clean code a margin of about 50 on this suite's runs, and the mildest planted bug
still fails it by a factor of about 160; tests/test_reference.py asserts the latter stays above
100 so the suite cannot silently lose its power.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

TRAJECTORY_RTOL = 3e-4


def trajectory_error(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     start: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """The worst tensor's ‖actual − expected‖ / ‖expected − start‖, and that tensor's name."""
    assert set(actual) == set(expected), (sorted(set(actual) ^ set(expected)))
    worst = (0.0, "")
    for name, value in expected.items():
        moved = (value - start[name]).norm().item()
        assert moved > 0, f"{name} did not move from the start: the comparison would be vacuous"
        worst = max(worst, ((actual[name] - value).norm().item() / moved, name))
    return worst


def assert_same_trajectory(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                           start: Mapping[str, torch.Tensor]) -> None:
    error, name = trajectory_error(actual, expected, start)
    assert error <= TRAJECTORY_RTOL, (
        f"{name}: relative error {error:.3g} > {TRAJECTORY_RTOL:g} (‖actual − expected‖ / ‖expected − start‖)")
