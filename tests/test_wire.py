"""strategies/wire.py: tensors packed into one record come back exactly, as views or copies;
a malformed record is a ValueError, never a wrong tensor."""

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.wire import INDEX_KEY, PACKED_KEY, array_views, from_array_record, to_array_record

ARRAYS = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4), "bf16_bits": np.arange(5, dtype=np.uint16),
          "codes": np.arange(255, dtype=np.uint8), "scales": np.array([0.25], np.float32),
          "empty": np.zeros((0, 3), np.float32), "f64": np.linspace(0, 1, 6).reshape(2, 1, 3),
          "strided": np.arange(20, dtype=np.int64)[::3]}


def test_packed_tensors_come_back_exactly_as_views_and_as_copies():
    record = to_array_record(ARRAYS)
    assert set(record) == {PACKED_KEY, INDEX_KEY}  # one Array for all tensors, whatever their number
    for read in (array_views, from_array_record):
        got = read(record)
        assert list(got) == list(ARRAYS)
        for name, array in ARRAYS.items():
            assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
            assert np.array_equal(got[name], array), name


def test_unpacked_records_hold_one_array_per_tensor_and_come_back_exactly():
    # Replies use this layout (fl_diloco/client_app.py): the reader must not care which it gets.
    record = to_array_record(ARRAYS, packed=False)
    assert set(record) == set(ARRAYS)
    got = from_array_record(record)
    assert all(got[n].dtype == a.dtype and np.array_equal(got[n], a) for n, a in ARRAYS.items())


def test_views_copy_nothing_and_copies_are_the_callers_own():
    record = to_array_record({"w": np.ones(1000, np.float32), "b": np.zeros(3, np.float32)})
    packed = np.frombuffer(record[PACKED_KEY].data, dtype=np.uint8)
    views, copies = array_views(record), from_array_record(record)
    assert all(np.shares_memory(v, packed) and not v.flags.writeable for v in views.values())
    assert all(not np.shares_memory(c, packed) and c.flags.writeable for c in copies.values())


def test_a_record_in_flowers_own_layout_is_read_as_flower_reads_it():
    record = ArrayRecord({"f32": Array(ARRAYS["f32"]), "fortran": Array(np.asfortranarray(ARRAYS["f64"][:, 0]))})
    for read in (array_views, from_array_record):
        got = read(record)
        assert np.array_equal(got["f32"], ARRAYS["f32"]) and np.array_equal(got["fortran"], ARRAYS["f64"][:, 0])
    assert from_array_record(ArrayRecord()) == {}


def _with_index(index) -> ArrayRecord:
    record = to_array_record({"w": np.ones(4, np.float32)})
    record[INDEX_KEY] = Array(np.frombuffer(json.dumps(index).encode(), np.uint8))
    return record


@pytest.mark.parametrize("index", [
    [["w", "<f4", [17], 0]],            # more floats than the packed (and padded) bytes hold
    [["w", "<f4", [4], 64]],            # starts past the packed bytes
    [["w", "<f4", [-4], 0]],            # a negative dimension
    [["w", "<f4", [1], -4]],            # a negative offset
    [["w", "not a dtype", [1], 0]],
    [["w", "|O", [1], 0]],              # Python objects
    [["w", "<f4"]],                     # too short an entry
    {"w": 1},                           # not a list of entries
])
def test_a_malformed_index_is_a_value_error(index):
    with pytest.raises(ValueError):
        from_array_record(_with_index(index))


def test_an_array_of_python_objects_is_refused():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    record = ArrayRecord({"evil": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())})
    with pytest.raises(ValueError, match="'evil' holds Python objects"):
        array_views(record)
