"""The data-parallel baseline: mean-gradient accumulation, an end-to-end run whose outputs
line up with DiLoCo's, and M = 1 being exactly one worker's inner loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clients.inner_loop import InnerTrainer
from clients.worker import build_trainer
from fl_diloco.checkpoint import load_checkpoint
from fl_diloco.config import RunConfig
from fl_diloco.data import load_corpus
from fl_diloco.dp_baseline import (accumulate_mean_gradient, modelled_bytes,
                                   train_data_parallel, worker_streams)
from fl_diloco.model import Transformer, model_config

# Tiny run: a separate small corpus cache (max_documents), a few steps of the 1M model.
TINY = dict(algorithm="dp", model="tiny", rounds=2, inner_steps=2, num_clients=2, batch_size=2,
            seq_len=32, eval_sequences=8, max_documents=120, warmup_steps=2, device="cpu",
            threads_per_worker=1)

SUMMARY_KEYS = {"algorithm", "num_clients", "inner_steps", "rounds", "tokens", "first_eval_loss",
                "final_eval_loss", "wall_seconds", "compute_seconds", "idle_seconds", "bytes_up",
                "bytes_down"}
RECORD_KEYS = {"round", "train_loss", "eval_loss", "tokens", "tokens_total", "tokens_per_second",
               "participants", "rejected", "compute_seconds", "idle_seconds", "bytes_up",
               "bytes_down"}


@pytest.fixture(autouse=True)
def _corpus_cache(tmp_path_factory, monkeypatch):
    """Reuse $FL_DILOCO_CACHE when set; otherwise keep the cache out of ~/.cache."""
    import os

    if not os.environ.get("FL_DILOCO_CACHE"):
        monkeypatch.setenv("FL_DILOCO_CACHE", str(tmp_path_factory.getbasetemp() / "fl-cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a small shared machine more threads make these tiny models far
    slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tmp_path, **changes) -> RunConfig:
    return RunConfig.from_mapping({**TINY, "out_dir": str(tmp_path / "run"), **changes})


def test_accumulated_gradient_is_the_gradient_of_the_global_batch_mean_loss():
    torch.manual_seed(0)
    model = Transformer(model_config("tiny-1m", vocab_size=300, seq_len=16))
    gen = torch.Generator().manual_seed(1)
    m_total, batch, seq = 3, 2, 16
    tokens = torch.randint(0, 300, (m_total * batch, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    local = [(inputs[m * batch:(m + 1) * batch], targets[m * batch:(m + 1) * batch])
             for m in range(m_total)]

    # A stale gradient must not leak into the accumulation.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    losses = accumulate_mean_gradient(model, local, "cpu")
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    _, global_loss = model(inputs, targets)
    global_loss.backward()
    assert losses.shape == (m_total,) and not losses.requires_grad
    assert losses.mean().item() == pytest.approx(global_loss.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # The check has teeth: an unscaled sum (missing 1/M) is M times larger.
    grad = model.head.weight.grad
    assert not torch.allclose(accumulated["head.weight"] * m_total, grad, rtol=1e-3, atol=1e-7)


def test_end_to_end_run_writes_a_diloco_comparable_summary(tmp_path):
    cfg = _cfg(tmp_path)
    summary = train_data_parallel(cfg)
    out_dir = tmp_path / "run"

    on_disk = json.loads((out_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["algorithm"] == summary["algorithm"] == "dp"
    m_total = cfg.num_clients
    steps = cfg.rounds * cfg.inner_steps
    assert on_disk["tokens"] == steps * m_total * cfg.batch_size * cfg.seq_len
    assert on_disk["final_eval_loss"] < on_disk["first_eval_loss"]
    assert on_disk["idle_seconds"] == 0.0 and on_disk["compute_seconds"] > 0
    n_params = on_disk["num_parameters"]
    assert on_disk["bytes_up"] == on_disk["bytes_down"] == m_total * steps * 4 * n_params
    assert "not measured" in on_disk["bytes_model"]

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[0]["eval_loss"] is not None and records[0]["tokens_total"] == 0
    for r in records[1:]:
        assert RECORD_KEYS <= set(r)
        assert r["participants"] == m_total and r["rejected"] == 0 and r["idle_seconds"] == 0
        assert r["bytes_up"] == r["bytes_down"] == modelled_bytes(m_total, cfg.inner_steps, n_params)
        assert np.isfinite(r["train_loss"])
    assert records[1]["eval_loss"] is None  # eval_every=5: only round 0 and the last round
    assert records[2]["eval_loss"] == on_disk["final_eval_loss"]
    assert json.loads((out_dir / "config.json").read_text())["algorithm"] == "dp"
    assert (out_dir / "loss_vs_tokens.png").is_file()

    model, saved_cfg = load_checkpoint(out_dir / "checkpoint")
    assert saved_cfg == cfg
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_worker_streams_match_what_the_diloco_workers_read(tmp_path):
    cfg = _cfg(tmp_path)
    streams = worker_streams(cfg, load_corpus(cfg.data_config()))
    for m, stream in enumerate(streams):
        worker = build_trainer(cfg, m, cfg.num_clients, "cpu").stream
        assert stream.seed == worker.seed
        np.testing.assert_array_equal(stream.sequences, worker.sequences)


def test_one_worker_baseline_is_exactly_the_worker_inner_loop(tmp_path):
    cfg = _cfg(tmp_path, num_clients=1)
    train_data_parallel(cfg)
    dp_model, _ = load_checkpoint(tmp_path / "run" / "checkpoint")

    trainer: InnerTrainer = build_trainer(cfg, 0, 1, "cpu")
    start = trainer.parameters_fp32()
    for _ in range(cfg.total_inner_steps):
        trainer.train_step()
    moved = False
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(dict(dp_model.named_parameters())[name], p.detach(),
                                   rtol=0, atol=1e-6, msg=name)
        moved |= not torch.equal(start[name], p.detach())
    assert moved  # the comparison is between trained parameters, not two initial copies
