"""Is the data-parallel baseline as fast as a plain PyTorch loop doing the same work? (CPU/GPU)

Two loops train the same model (same init) on global batches of M × batch_size sequences
with the same AdamW settings, gradient clipping and per-step learning rate:

(a) **dp**: the project's baseline step, `fl_diloco.dp_baseline.data_parallel_step`, drawing
    each worker's local batch from its shard's `BatchStream` as `train_data_parallel` does.
(b) **plain**: the minimal loop anyone would write: one forward and backward of the
    global batch (drawn before the clock starts), `clip_grad_norm_`, `optimizer.step()`.

They alternate in this one process, `--repeats` times each, `--steps` optimizer steps per
repetition, after one untimed warm-up repetition each. Two figures per side: its median
repetition, and its fastest, which is the one least disturbed by other work on the machine.
The ratio (dp / plain, 1.0 = the baseline costs nothing) is what to read; on cores shared
with other work, several torch threads in one process can slow down tenfold from one
repetition to the next (compare --threads 1), so trust the ratios only when median and
fastest agree. The LAST line of stdout is one JSON object with the figures.

Usage:
    python bench/dp_baseline_speed.py [--model tiny --num-clients 4 --batch-size 8
                                       --seq-len 128 --steps 10 --repeats 5 --threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clients.inner_loop import inner_lr_at, make_inner_optimizer
from fl_diloco.config import RunConfig, resolve_device
from fl_diloco.data import load_corpus
from fl_diloco.dp_baseline import data_parallel_step, worker_streams
from fl_diloco.model import Transformer, model_config


def build(cfg: RunConfig, vocab_size: int, device: str) -> tuple[Transformer, torch.optim.AdamW]:
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(cfg.model_preset, vocab_size=vocab_size, seq_len=cfg.seq_len)).to(device)
    model.train()
    return model, make_inner_optimizer(model, cfg)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-documents", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = RunConfig.from_mapping({"algorithm": "dp", "model": args.model, "num_clients": args.num_clients,
                                  "batch_size": args.batch_size, "seq_len": args.seq_len,
                                  "max_documents": args.max_documents, "device": args.device})
    device = resolve_device(cfg.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(cfg.data_config())
    streams = worker_streams(cfg, corpus)
    dp_model, dp_optimizer = build(cfg, corpus.vocab_size, device)
    plain_model, plain_optimizer = build(cfg, corpus.vocab_size, device)
    # The plain loop gets its global batches ready-made, as from a prefetching loader.
    plain_batches = []
    for _ in range(args.steps):
        local = [s.next_batch() for s in worker_streams(cfg, corpus)]
        plain_batches.append((torch.cat([x for x, _ in local]).to(device),
                              torch.cat([y for _, y in local]).to(device)))
    tokens_per_step = cfg.num_clients * cfg.batch_size * cfg.seq_len

    def dp_repetition(first_step: int) -> None:
        for i in range(args.steps):
            data_parallel_step(dp_model, dp_optimizer, streams, inner_lr_at(first_step + i, cfg), cfg, device)

    def plain_repetition(first_step: int) -> None:
        for i, (inputs, targets) in enumerate(plain_batches):
            _, loss = plain_model(inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), cfg.grad_clip)
            for group in plain_optimizer.param_groups:
                group["lr"] = inner_lr_at(first_step + i, cfg)
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)

    seconds: dict[str, list[float]] = {"dp": [], "plain": []}
    sides = {"dp": dp_repetition, "plain": plain_repetition}
    print(f"model={cfg.model_preset} M={cfg.num_clients} batch_size={cfg.batch_size} seq_len={cfg.seq_len} "
          f"device={device} threads={torch.get_num_threads()}: {args.steps} steps x {args.repeats} "
          f"repetitions per side, alternating", flush=True)
    for repetition in range(args.repeats + 1):  # repetition 0 warms up and is not counted
        for name, run in sides.items():
            synchronize(device)
            began = time.perf_counter()
            run(repetition * args.steps)
            synchronize(device)
            elapsed = time.perf_counter() - began
            if repetition:
                seconds[name].append(elapsed)
                print(f"  rep {repetition} {name:>5}: {tokens_per_step * args.steps / elapsed:9.0f} tokens/s",
                      flush=True)
    result = {"model": cfg.model_preset, "num_clients": cfg.num_clients, "batch_size": cfg.batch_size,
              "seq_len": cfg.seq_len, "device": device, "threads": torch.get_num_threads(),
              "steps": args.steps, "repeats": args.repeats}
    for label, pick in (("median", statistics.median), ("fastest", min)):
        rates = {name: tokens_per_step * args.steps / pick(s) for name, s in seconds.items()}
        result.update({f"dp_tokens_per_s_{label}": round(rates["dp"], 1),
                       f"plain_tokens_per_s_{label}": round(rates["plain"], 1),
                       f"ratio_dp_over_plain_{label}": round(rates["dp"] / rates["plain"], 3)})
        print(f"{label:>7} repetition: dp {rates['dp']:.0f} tokens/s, plain PyTorch {rates['plain']:.0f} "
              f"tokens/s, ratio {rates['dp'] / rates['plain']:.3f}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
