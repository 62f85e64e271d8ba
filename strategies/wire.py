"""Tensors on and off Flower records, and the bytes they really take on the wire."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

if TYPE_CHECKING:  # the ClientApp adapter uses this module and must not import torch
    import torch


# A record holds its tensors packed in one Array, with an index: Flower moves a record as one
# object per Array and per 5 MB chunk, each in its own HTTP request at every hop, so a model's
# tens to hundreds of tensors would cost as many requests each way
# (bench/deployment_round_anatomy.py measures the hops).
PACKED_KEY = "packed"  # uint8: the tensors' bytes, each starting at a multiple of ALIGN
INDEX_KEY = "index"  # uint8: JSON [[name, dtype, shape, offset], ...]
ALIGN = 64


def to_array_record(tensors: Mapping[str, torch.Tensor | np.ndarray], packed: bool = True) -> ArrayRecord:
    """`tensors` packed into one record (copied once, into the bytes Flower sends); with
    packed=False in Flower's own layout, one Array per tensor (both are read back alike)."""
    arrays = {name: np.ascontiguousarray(np.asarray(t)) for name, t in tensors.items()}
    if not packed:
        return ArrayRecord({name: Array(array) for name, array in arrays.items()})
    index, pieces, offset = [], [], 0
    for name, array in arrays.items():
        index.append([name, array.dtype.str, list(array.shape), offset])
        padding = -array.nbytes % ALIGN
        pieces += [array.reshape(-1).view(np.uint8), bytes(padding)]
        offset += array.nbytes + padding
    return ArrayRecord({PACKED_KEY: _uint8_array(pieces, offset),
                        INDEX_KEY: Array(np.frombuffer(json.dumps(index).encode(), np.uint8))})


def _uint8_array(pieces: list, size: int) -> Array:
    """Flower's Array of the uint8 vector `pieces` joined, built as np.save would write it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
    return Array(dtype="uint8", shape=(size,), stype=SType.NUMPY, data=b"".join([header.getvalue(), *pieces]))


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's tensors, each a fresh array. ValueError if the record is malformed."""
    return {name: view.copy() for name, view in array_views(record).items()}


def array_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's tensors as read-only views of the bytes the record holds, where
    `from_array_record` copies them: for code that only passes them on. A record that is not
    packed (Flower's own layout: one Array per tensor) is read as such."""
    if set(record) != {PACKED_KEY, INDEX_KEY}:
        return {name: _npy_view(name, array) for name, array in record.items()}
    packed, index_bytes = (_npy_view(key, record[key]) for key in (PACKED_KEY, INDEX_KEY))
    if packed.dtype != np.uint8 or packed.ndim != 1 or index_bytes.dtype != np.uint8:
        raise ValueError(f"a packed record's '{PACKED_KEY}' and '{INDEX_KEY}' must be uint8 vectors")
    try:
        index = json.loads(index_bytes.tobytes())
        tensors = {}
        for name, dtype, shape, offset in index:
            dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
            count = int(np.prod(shape, dtype=np.int64))
            end = int(offset) + count * dtype.itemsize
            if dtype.hasobject or min(shape, default=0) < 0 or not 0 <= int(offset) <= end <= packed.size:
                raise ValueError(f"tensor {name!r}: {dtype} {shape} at byte {offset} does not fit the "
                                 f"{packed.size} packed bytes")
            tensors[str(name)] = packed[int(offset):end].view(dtype).reshape(shape)
        return tensors
    except (TypeError, KeyError, IndexError, OverflowError) as err:
        raise ValueError(f"the record's '{INDEX_KEY}' is malformed: {err!r}") from None


def _npy_view(name: str, array: Array) -> np.ndarray:
    if array.stype != SType.NUMPY:
        raise ValueError(f"array {name!r} is stored as {array.stype!r}, not {SType.NUMPY!r}")
    stream = io.BytesIO(array.data)  # shares the bytes, copies nothing
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(stream))
    if read_header is None:
        raise ValueError(f"array {name!r} has an .npy format version this reader does not know")
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError(f"array {name!r} holds Python objects; refusing to read it")
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell()).reshape(
        shape, order="F" if fortran_order else "C")


def serialized_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes it.

    Flower sends a record as a tree of objects (records, arrays, array chunks), each
    deflated on its own and deduplicated by content hash; summing the deflated size of
    every distinct object is what actually crosses the link.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
