"""Shared fixtures: a small, fast run config, a per-session corpus cache, task ids, bench loading."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fl_diloco.config import RunConfig


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    # One tokenizer/token cache for the whole session (or the user's, if they set one),
    # so every test after the first loads the corpus in well under a second.
    if "FL_DILOCO_CACHE" not in os.environ:
        os.environ["FL_DILOCO_CACHE"] = str(tmp_path_factory.mktemp("corpus-cache"))
    # Worker processes started by tests keep their sockets inside the test's temp tree.
    os.environ["FL_DILOCO_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Tiny models run fastest on one thread, and a busy machine does not slow them 10x.
    torch.set_num_threads(1)
    yield


def small_config(tmp_path, **overrides) -> RunConfig:
    """A config that trains for seconds: tiny model, short sequences, few documents."""
    values = dict(model="tiny", num_clients=2, inner_steps=4, rounds=3, batch_size=4, seq_len=32,
                  max_documents=150, eval_sequences=32, eval_every=1, warmup_steps=2,
                  inner_lr=3e-3, threads_per_worker=1, out_dir=str(tmp_path / "run"))
    values.update(overrides)
    return RunConfig.from_mapping(values)


@pytest.fixture
def task_identity():
    # Messages are stamped with the running task's ids; give the test process some.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def load_bench(name: str) -> ModuleType:
    """A benchmark script under bench/ as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
