"""Tensors on and off Flower records, and the bytes they really take on the wire."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

if TYPE_CHECKING:  # the ClientApp adapter uses this module and must not import torch
    import torch


def to_array_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(np.asarray(t))) for name, t in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def serialized_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes it.

    Flower sends a record as a tree of objects (records, arrays, array chunks), each
    deflated on its own and deduplicated by content hash; summing the deflated size of
    every distinct object is what actually crosses the link.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
