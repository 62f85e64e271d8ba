"""TensorBoard logging: the scalars written are the numeric fields of each round's record,
read back from the event files."""

import sys

import pytest

from fl_diloco.tracking import TENSORBOARD_DIR, TensorBoardLog


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_numeric_fields_become_scalars_at_their_round(tmp_path):
    pytest.importorskip("tensorboard", reason="an optional extra: pip install -e '.[tensorboard]'")
    log = TensorBoardLog(tmp_path)
    log.log({"round": 0, "eval_loss": 8.35, "train_loss": None, "tokens_total": 0})
    log.log({"round": 1, "eval_loss": 7.5, "train_loss": 7.9, "tokens_total": 1024, "rejected": 0,
             "fragment": 0, "variant": "diloco", "partial": True, "bytes_up": float("nan"),
             "clients": [{"node_id": 123, "partition_id": 1, "train_loss": 7.8, "idle_seconds": 0.5}]})
    log.close()
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["eval_loss"] == [(0, pytest.approx(8.35)), (1, pytest.approx(7.5))]
    assert scalars["train_loss"] == [(1, pytest.approx(7.9))]  # None is not a point
    assert scalars["tokens_total"] == [(0, 0.0), (1, 1024.0)]
    assert scalars["client1/train_loss"] == [(1, pytest.approx(7.8))]
    assert scalars["client1/idle_seconds"] == [(1, 0.5)]
    # Text, flags, NaN, the step itself and node ids are not curves.
    assert not {"variant", "partial", "bytes_up", "round", "client1/node_id", "client1/partition_id"} & set(scalars)


def test_without_tensorboard_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[tensorboard\]\""):
        TensorBoardLog(tmp_path)


def test_a_run_with_tensorboard_true_writes_its_rounds(tmp_path):
    pytest.importorskip("tensorboard", reason="an optional extra: pip install -e '.[tensorboard]'")
    from fl_diloco.server_app import run_server
    from tests.conftest import small_config
    from tests.fake_grid import FakeGrid

    grid = FakeGrid(2)
    try:
        run_server(grid, small_config(tmp_path, rounds=2, tensorboard=True, checkpoint_every=0))
    finally:
        grid.stop_all()
    scalars = read_scalars(tmp_path / "run" / TENSORBOARD_DIR)
    assert [step for step, _ in scalars["eval_loss"]] == [0, 1, 2]
    assert [step for step, _ in scalars["client0/compute_seconds"]] == [1, 2]
