"""Checks a client's reply must pass before its outer gradient is averaged in.

A reply that fails is logged with its node id and left out of the round; it never touches
the global parameters or the outer optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def outer_gradient_problem(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]
) -> str | None:
    """Why `arrays` is not a usable outer gradient for parameters shaped like `reference`,
    or None when it is."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"wrong tensor names (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, " \
               f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
    for name, ref in reference.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(ref.shape):
            return f"'{name}' has shape {tuple(array.shape)}, expected {tuple(ref.shape)}"
        if array.dtype != np.float32:
            return f"'{name}' has dtype {array.dtype}, expected float32"
        if not np.isfinite(array).all():
            return f"'{name}' contains NaN or Inf"
    return None
