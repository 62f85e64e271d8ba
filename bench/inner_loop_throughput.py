"""Does the worker's inner loop cost anything over a plain PyTorch training loop?

Two loops train the same model (same preset, same initial weights) on the same kind of
batches, with the same precision, the same AdamW settings (fused on CUDA), the same gradient
clipping and the same micro-batching, in this one process:

(a) **InnerTrainer**: the worker's real inner loop (``clients.inner_loop.InnerTrainer``), its
    ``train_step`` called as the worker calls it, the losses read once per repetition.
(b) **plain**: a minimal loop written below (``plain_step``), the way a nanoGPT-style script
    would write it: batch to the device, forward under autocast, backward, clip, AdamW step.

Both read their batches from a ``fl_diloco.data.BatchStream`` over random token sequences,
so data loading costs the same on both sides. The repetitions alternate which loop runs
first (a, b, b, a, ...), after a few warm-up steps each (compilation, allocator, caches).

What is measured: tokens/s of each loop over each repetition (batch_size × seq_len × steps /
seconds, the device synchronised at the end of each repetition), their ratio per repetition
(InnerTrainer / plain: 1.0 = the worker costs nothing), and on CUDA the MFU of each against
the device's peak bf16 FLOP/s (fl_diloco/flops.py; ``--peak-flops`` overrides). The summary
takes the median over repetitions: on a machine shared with other work a repetition that
was descheduled says nothing about either loop. The LAST line of stdout is one JSON object.

Usage:
    python bench/inner_loop_throughput.py                     # tiny model on CPU, about a minute
    python bench/inner_loop_throughput.py --model 1b --seq-len 2048 --batch-size 8 \\
        --precision bf16 --compile --steps 20 --reps 5        # a GPU (see the README)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Runnable as `python bench/inner_loop_throughput.py` from a checkout: put the repo root first.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from clients.inner_loop import InnerTrainer  # noqa: E402
from fl_diloco.config import MODEL_ALIASES, RunConfig, resolve_device, resolve_precision  # noqa: E402
from fl_diloco.data import BatchStream  # noqa: E402
from fl_diloco.flops import device_peak_flops, mfu, model_flops_per_token  # noqa: E402
from fl_diloco.model import PRESETS, Transformer, model_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=[*MODEL_ALIASES, *PRESETS])
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="sequences per forward/backward (default 0 = the whole batch)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on shared cores one thread is the steadiest)")
    p.add_argument("--steps", type=int, default=10, help="steps per repetition (default 10)")
    p.add_argument("--reps", type=int, default=20, help="repetitions of each loop (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s of the device for MFU (default: fl_diloco/flops.py's table)")
    return p.parse_args(argv)


def random_stream(vocab_size: int, seq_len: int, batch_size: int) -> BatchStream:
    """Batches of random tokens: the loops' speed does not depend on what the text says."""
    rng = np.random.default_rng(0)
    sequences = rng.integers(0, vocab_size, size=(max(256, 4 * batch_size), seq_len + 1))
    return BatchStream(sequences, batch_size, seed=0)


class PlainLoop:
    """The baseline: a training loop as short as PyTorch allows, with the same settings."""

    def __init__(self, model: torch.nn.Module, stream: BatchStream, cfg: RunConfig, device: str,
                 precision: str) -> None:
        self.model, self.stream, self.device = model, stream, device
        self.forward = torch.compile(model) if cfg.compile else model
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.micro_batches = cfg.batch_size // (cfg.micro_batch_size or cfg.batch_size)
        self.grad_clip, self.lr = cfg.grad_clip, cfg.inner_lr
        on_cuda = device.startswith("cuda")
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.inner_lr, betas=(cfg.beta1, cfg.beta2), **({"fused": True} if on_cuda else {}))
        self.pin = on_cuda

    def step(self) -> torch.Tensor:
        inputs, targets = self.stream.next_batch()
        if self.pin:
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
            targets = targets.pin_memory().to(self.device, non_blocking=True)
        for x, y in zip(inputs.chunk(self.micro_batches), targets.chunk(self.micro_batches)):
            with torch.autocast(self.device.split(":")[0], dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                _, loss = self.forward(x, y)
            (loss / self.micro_batches).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # the last micro-batch's loss, as nanoGPT-style loops report it


def timed(step, steps: int, device: str) -> tuple[float, float]:
    """Seconds for `steps` steps (the device drained before and after) and their mean loss."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    losses = torch.stack([step() for _ in range(steps)])
    mean_loss = losses.mean().item()  # waits for the device: the steps' work is inside
    return time.perf_counter() - began, mean_loss


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    cfg = RunConfig.from_mapping({
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size, "precision": args.precision,
        "compile": args.compile, "device": args.device, "peak_flops": args.peak_flops,
        "warmup_steps": 0, "rounds": 1_000_000})  # a flat learning rate: no schedule to time
    precision = resolve_precision(cfg.precision, device)
    model_cfg = model_config(cfg.model_preset, seq_len=args.seq_len)

    def build() -> Transformer:
        torch.manual_seed(0)
        with torch.device(device):
            return Transformer(model_cfg)

    trainer = InnerTrainer(build(), random_stream(model_cfg.vocab_size, args.seq_len, args.batch_size),
                           cfg, device)
    plain = PlainLoop(build(), random_stream(model_cfg.vocab_size, args.seq_len, args.batch_size),
                      cfg, device, precision)
    loops = {"inner_trainer": trainer.train_step, "plain": plain.step}
    tokens = args.batch_size * args.seq_len * args.steps
    flops_per_token = model_flops_per_token(model_cfg, args.seq_len)
    peak = device_peak_flops(device, args.peak_flops)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"inner loop throughput: {args.model} ({model_cfg.n_layers} layers, d={model_cfg.d_model}), "
          f"batch {args.batch_size} x {args.seq_len} tokens"
          + (f" in micro-batches of {args.micro_batch_size}" if args.micro_batch_size else "")
          + f", {precision}{', compiled' if args.compile else ''}, on {name}"
          + (f", {torch.get_num_threads()} CPU thread(s)" if device == "cpu" else ""), flush=True)

    began = time.perf_counter()
    for label, step in loops.items():
        timed(step, args.warmup, device)
    print(f"  warm-up: {args.warmup} steps each, {time.perf_counter() - began:.1f}s", flush=True)
    rates: dict[str, list[float]] = {label: [] for label in loops}
    ratios = []
    print(f"  {'rep':>3}  {'first':>13}  {'InnerTrainer tok/s':>18}  {'plain tok/s':>11}  {'ratio':>6}")
    for rep in range(args.reps):
        order = list(loops) if rep % 2 == 0 else list(loops)[::-1]
        for label in order:
            seconds, _ = timed(loops[label], args.steps, device)
            rates[label].append(tokens / seconds)
        ratios.append(rates["inner_trainer"][-1] / rates["plain"][-1])
        print(f"  {rep:>3}  {order[0]:>13}  {rates['inner_trainer'][-1]:>18.0f}  "
              f"{rates['plain'][-1]:>11.0f}  {ratios[-1]:>6.3f}", flush=True)

    median = {label: statistics.median(values) for label, values in rates.items()}
    result = {
        "model": args.model, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len, "precision": precision, "compile": args.compile,
        "device": name, "steps": args.steps, "reps": args.reps,
        "tokens_per_second": median,
        "ratio": statistics.median(ratios),
        "flops_per_token": flops_per_token,
        "mfu": ({label: mfu(rate, flops_per_token, peak.flops) for label, rate in median.items()}
                if peak.flops else None),
        "peak_flops": peak.flops,
        "peak_flops_source": peak.source,
    }
    print(f"\n  median tokens/s: InnerTrainer {median['inner_trainer']:.0f}, plain {median['plain']:.0f}; "
          f"ratio (median of the reps' ratios) {result['ratio']:.3f}  (goal >= 0.97)")
    if result["mfu"]:
        print(f"  MFU: InnerTrainer {result['mfu']['inner_trainer']:.1%}, plain "
              f"{result['mfu']['plain']:.1%} of {peak.flops:.3g} FLOP/s ({peak.source})")
    else:
        print(f"  MFU: none ({peak.source})")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
