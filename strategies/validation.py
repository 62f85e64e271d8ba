"""Checks a client's outer gradient must pass before it is averaged in.

A reply that fails is logged with its node id and left out of the round; it never touches
the global parameters or the outer optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from strategies.codecs import CodecError, decode_tensors
from strategies.outer_optimizer import Tensors


def decode_outer_gradient(arrays: Mapping[str, np.ndarray], precision: str,
                          shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
    """The fp32 outer gradient in `arrays`, which must hold exactly the tensors of `shapes`
    encoded at `precision`; raises CodecError saying what is wrong otherwise."""
    tensors = decode_tensors(arrays, precision, shapes)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CodecError(f"'{name}' contains NaN or Inf")
    return tensors
