"""The data-parallel baseline: every step averages the M workers' gradients.

See docs/algorithms.md#data-parallel-baseline.

`train_data_parallel(cfg)` trains the same model (same init) on the same data (the same M
shards, each walked by the same `BatchStream` seed a DiLoCo worker would use) with the same
token budget as a DiLoCo run: `cfg.total_inner_steps` (= rounds × inner_steps) optimizer
steps, each on a global batch of M × batch_size sequences. The gradient of each step is
the mean of the M workers' local-batch gradients, accumulated in one process as
`(loss_m / M).backward()`; it is then clipped and applied with one AdamW step through the
very helpers the DiLoCo worker uses (`make_inner_optimizer`, `inner_lr_at`,
`clip_and_step`), so the baseline and the worker share one inner loop. With M = 1 the
baseline is exactly a single worker's inner loop run for the whole budget.

Logging lines up with DiLoCo runs: every `inner_steps` optimizer steps count as one
"round" and produce one metrics.jsonl record with the keys the ServerApp writes, and the
run ends in the same `finish_run`, so summaries, tables and plots compare row by row.

Bytes are NOT measured here: nothing crosses a network in this single process. The
reported `bytes_up` / `bytes_down` are what a data-parallel run over a star WOULD send if
every worker sent its fp32 gradient up and received the fp32 average down at every step:
bytes_up = bytes_down = M × steps × 4 × num_parameters (per round: steps = inner_steps).
The summary repeats this in `extra["bytes_model"]` so no one mistakes it for a measurement.

`compute_seconds` is the measured time this one process spent on training steps (the M
micro-batches run one after another, evaluation excluded); `idle_seconds` is 0. On the CPU
the process keeps torch's default thread count unless `threads_per_worker` is set, in which
case it uses that many threads (it is the only worker process).

Speed: bench/dp_baseline_speed.py times a step against a plain PyTorch loop that runs the
global batch in one pass; on a quiet 2-core CPU the M micro-batches were the faster of the
two (smaller batches stay in cache), which is why they stay. Compare its tokens/s with a
DiLoCo run's only on a quiet machine: DiLoCo's M workers run as M processes of cpu_count/M
threads, this baseline as one process of cpu_count threads, and on cores shared with other
work a process whose threads wait for each other at every operation slows down several times
more than M single-threaded ones (`threads_per_worker=1` shows it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clients.inner_loop import clip_and_step, inner_lr_at, make_inner_optimizer
from clients.worker import worker_stream
from fl_diloco.checkpoint import save_checkpoint
from fl_diloco.config import ConfigError, RunConfig, resolve_device
from fl_diloco.data import BatchStream, Corpus, load_corpus
from fl_diloco.evaluation import evaluate
from fl_diloco.model import Transformer, model_config, num_parameters
from fl_diloco.reporting import RunLog, failure_recorded, finish_run
from fl_diloco.run_dir import prepare_out_dir

FP32_BYTES = 4


def bytes_model_description(num_clients: int, num_params: int) -> str:
    """The sentence stored in summary["bytes_model"]: how the byte counts were derived."""
    return (
        "modelled, not measured (single process, no network): a data-parallel star where each "
        "of the M workers sends its fp32 gradient up and receives the fp32 average down every "
        f"optimizer step; bytes_up = bytes_down = M x steps x 4 x num_parameters "
        f"(M={num_clients}, num_parameters={num_params})"
    )


def modelled_bytes(num_clients: int, steps: int, num_params: int) -> int:
    """Bytes one direction of a fp32 data-parallel star would carry over `steps` steps."""
    return num_clients * steps * FP32_BYTES * num_params


def worker_streams(cfg: RunConfig, corpus: Corpus) -> list[BatchStream]:
    """The M shards' streams, each with the seed DiLoCo worker m uses (clients/worker.py)."""
    return [worker_stream(cfg, corpus, m, cfg.num_clients) for m in range(cfg.num_clients)]


def accumulate_mean_gradient(model: torch.nn.Module,
                             batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                             device: str) -> torch.Tensor:
    """Leave in `.grad` the mean of the local batches' loss gradients; return their losses
    (a detached tensor, one per batch, on `device`).

    Each local loss is already a mean over its batch's tokens, so with equal-sized local
    batches this is the gradient of the mean loss over the concatenated global batch.
    Any gradient left in `.grad` beforehand is cleared first. The losses stay on the device:
    reading each one (`.item()`) would make the host wait for the GPU every micro-batch.
    """
    model.zero_grad(set_to_none=True)
    count = len(batches)
    losses = []
    for inputs, targets in batches:
        _, loss = model(inputs.to(device), targets.to(device))
        (loss / count).backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def data_parallel_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       streams: Sequence[BatchStream], lr: float, cfg: RunConfig, device: str) -> torch.Tensor:
    """One optimizer step on the next global batch (one local batch per stream); returns
    the local batches' losses, as accumulate_mean_gradient does."""
    losses = accumulate_mean_gradient(model, [s.next_batch() for s in streams], device)
    clip_and_step(model, optimizer, lr, cfg.grad_clip)
    return losses


def train_data_parallel(cfg: RunConfig) -> dict[str, Any]:
    """Run the data-parallel baseline for `cfg`'s token budget; returns the run's summary
    (also written to summary.json under the output directory)."""
    if cfg.algorithm != "dp":
        cfg = cfg.replace(algorithm="dp")  # config.json and the default out_dir say "dp"
    if cfg.resume:
        raise ConfigError(f"resume={cfg.resume}: algorithm=dp runs in one process and writes no "
                          f"resumable checkpoint; leave resume unset to start it again")
    out_dir = prepare_out_dir(cfg)
    with failure_recorded(out_dir):
        return _train_into(out_dir, cfg)


def _train_into(out_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    print(f"fl-diloco dp: writing to {out_dir}", flush=True)
    corpus = load_corpus(cfg.data_config())
    validation = corpus.validation_sequences()[: cfg.eval_sequences]
    streams = worker_streams(cfg, corpus)
    device = resolve_device(cfg.device)
    if device == "cpu" and cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg.model_preset, vocab_size=corpus.vocab_size, seq_len=cfg.seq_len)
    model = Transformer(model_cfg).to(device)
    optimizer = make_inner_optimizer(model, cfg)
    n_params = num_parameters(model)
    m_total = cfg.num_clients

    def eval_loss() -> float:
        loss = evaluate(model, validation, cfg.batch_size, device)["eval_loss"]
        model.train()
        return loss

    run_log = RunLog(out_dir, cfg.rounds, tensorboard=cfg.tensorboard)
    run_log.log({"round": 0, "tokens_total": 0, "eval_loss": eval_loss()})

    step = 0
    tokens_total = 0
    compute_total = 0.0
    bytes_round = modelled_bytes(m_total, cfg.inner_steps, n_params)
    model.train()
    for round_ in range(1, cfg.rounds + 1):
        began = time.perf_counter()
        step_losses = []
        for _ in range(cfg.inner_steps):
            step_losses.append(data_parallel_step(model, optimizer, streams, inner_lr_at(step, cfg), cfg, device))
            step += 1
        losses = torch.stack(step_losses).cpu().numpy()  # [inner_steps, M]; waits for the device
        seconds = time.perf_counter() - began
        compute_total += seconds
        tokens = cfg.inner_steps * m_total * cfg.batch_size * cfg.seq_len
        tokens_total += tokens
        due = round_ % cfg.eval_every == 0 or round_ == cfg.rounds
        run_log.log({
            "round": round_,
            "train_loss": float(losses.mean()),
            "eval_loss": eval_loss() if due else None,
            "tokens": tokens,
            "tokens_total": tokens_total,
            "tokens_per_second": tokens / seconds,
            "participants": m_total,
            "rejected": 0,
            "unavailable": 0,
            "unavailable_nodes": [],
            "compute_seconds": seconds,
            "idle_seconds": 0.0,
            "bytes_up": bytes_round,
            "bytes_down": bytes_round,
            "clients": [{"partition_id": m, "train_loss": float(losses[:, m].mean()),
                         "tokens": tokens // m_total} for m in range(m_total)],
        })

    params = dict(model.named_parameters())  # a tied embed/head matrix appears once
    save_checkpoint(out_dir / "checkpoint", params, cfg, model_cfg,
                    extra={"round": cfg.rounds, "tokens": tokens_total, "inner_step": step})
    total_bytes = modelled_bytes(m_total, step, n_params)
    return finish_run(
        out_dir, "dp", cfg, run_log,
        compute_seconds=compute_total,
        idle_seconds=0.0,
        bytes_up=total_bytes,
        bytes_down=total_bytes,
        extra={"unigram_entropy": corpus.unigram_entropy(),
               "num_parameters": n_params,
               "bytes_model": bytes_model_description(m_total, n_params),
               "rejected_replies": 0,
               "unavailable_node_rounds": 0,
               "optimizer_steps": step,
               "global_batch_size": m_total * cfg.batch_size},
    )
