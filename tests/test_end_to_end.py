"""A real Flower simulation through the ServerApp and ClientApp: 2 clients × 3 rounds."""

import json

import pytest

from fl_diloco.checkpoint import load_checkpoint
from fl_diloco.config import ConfigError
from fl_diloco.data import load_corpus
from fl_diloco.evaluation import evaluate
from fl_diloco.flops import model_flops_per_token
from fl_diloco.server_app import check_partitions
from fl_diloco.simulation import simulate
from tests.conftest import small_config

REQUIRED_SUMMARY_KEYS = {"algorithm", "num_clients", "inner_steps", "rounds", "tokens", "first_eval_loss",
                         "final_eval_loss", "wall_seconds", "compute_seconds", "idle_seconds",
                         "bytes_up", "bytes_down"}


def test_simulation_trains_and_writes_its_outputs(tmp_path):
    cfg = small_config(tmp_path, num_clients=2, rounds=3, inner_steps=8)
    summary = simulate(cfg)
    out_dir = tmp_path / "run"

    assert REQUIRED_SUMMARY_KEYS <= set(summary)
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 0.5
    assert summary["tokens"] == 2 * 3 * 8 * cfg.batch_size * cfg.seq_len
    assert summary["rejected_replies"] == 0
    # Each round sends every client the fp32 model and gets an fp32 outer gradient back.
    model_bytes = 4 * summary["num_parameters"]
    assert 2 * 3 * model_bytes <= summary["bytes_down"] < 1.1 * 2 * 3 * model_bytes
    assert 2 * 3 * model_bytes <= summary["bytes_up"] < 1.1 * 2 * 3 * model_bytes

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["participants"] == 2 for r in records[1:])
    # Throughput while computing, per worker; no MFU on a CPU, and the summary says why.
    assert all(r["tokens_per_second_per_worker"] > 0 and r["mfu"] is None for r in records[1:])
    assert summary["tokens_per_second_per_worker"] == pytest.approx(
        summary["tokens"] / summary["compute_seconds"])
    assert summary["mfu"] is None and "peak_flops" in summary["mfu_note"]
    assert all(w["tokens_per_second"] > 0 for w in summary["workers"])
    assert (out_dir / "loss_vs_tokens.png").stat().st_size > 0

    # The checkpoint loads through the documented function and is the evaluated model.
    model, run_config = load_checkpoint(out_dir / "checkpoint")
    assert run_config == cfg
    assert summary["flops_per_token"] == model_flops_per_token(model.cfg, cfg.seq_len)
    corpus = load_corpus(cfg.data_config())
    loss = evaluate(model, corpus.validation_sequences()[: cfg.eval_sequences], cfg.batch_size, "cpu")
    assert loss["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)


def test_shards_too_small_for_a_batch_fail_before_training(tmp_path):
    cfg = small_config(tmp_path, num_clients=8, batch_size=100_000, max_documents=60)
    with pytest.raises(ConfigError, match="num_clients=8"):
        check_partitions(load_corpus(cfg.data_config()), cfg)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="corrupt or incompatible"):
        load_checkpoint(tmp_path)


def test_loading_parameters_refuses_a_missing_tensor():
    from fl_diloco.model import Transformer, load_parameters, model_config

    model = Transformer(model_config("tiny-1m", vocab_size=300, seq_len=16))
    params = {n: p.detach().clone() + 1.0 for n, p in model.named_parameters()}
    load_parameters(model, params)
    assert all((p == params[n]).all() for n, p in model.named_parameters())
    del params["norm.weight"]
    with pytest.raises(KeyError, match="norm.weight"):
        load_parameters(model, params)


def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(tmp_path):
    from fl_diloco.atomic import atomic_write

    target = tmp_path / "model.safetensors"
    atomic_write(target, lambda fh: fh.write(b"good"))

    def fail_midway(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fail_midway)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left
