"""One site on 1 and on R ranks: tokens/s of its inner steps, and memory per rank, ddp vs fsdp.

A site (clients/site.py) is one Flower node's worker trained by `ranks_per_worker` processes;
each rank takes `batch_size` sequences of the site's batch, so R ranks train R times the tokens
of one per step. This script starts the ranks the way the worker does (torch.multiprocessing
spawn, a TCPStore on the loopback, gloo on CPUs, NCCL when each rank has a GPU of its own),
builds each rank's InnerTrainer exactly as the worker does, and measures:

  throughput  tokens/s of the site's inner steps (`--model`, ddp) on 1 rank with the per-rank
              batch, on 1 rank with the R-rank site's batch, and on R ranks; the gradient
              all-reduce included, the outer step (once every H steps) not
  memory      per rank, after a few steps of `--memory-model` under ddp and under fsdp: the
              bytes of the rank's parameters and AdamW moments (exact, from its tensors: fsdp
              should hold about 1/R of ddp's), of its outer state (θ and the Nesterov buffer:
              under fsdp its 1/R, under ddp all on rank 0), and its peak memory (CUDA: max allocated;
              CPU: peak resident set, which also counts the interpreter and libraries)

On a CPU each rank gets `--threads-per-rank` threads (default 1, a core as a stand-in for a
device), and the ranks share the machine with whatever else runs: 2 ranks on 2 busy cores
say what the group costs, not what GPUs would gain. On a machine with R GPUs
each rank gets its own; with fewer, ranks share them round-robin over gloo (a smoke test).
The LAST line of stdout is one JSON object.

Usage:
    python bench/site_scaling.py [--ranks 2] [--model tiny] [--memory-model 35m] [--device auto]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing  # noqa: E402

from bench.inner_loop_throughput import random_stream  # noqa: E402
from clients.inner_loop import InnerTrainer  # noqa: E402
from clients.fragment import Fragment  # noqa: E402
from clients.site import LOOPBACK, RankSlice, ShardLayout, SiteGroup, _backend, rank_device  # noqa: E402
from fl_diloco.config import MODEL_ALIASES, RunConfig, resolve_device  # noqa: E402
from fl_diloco.model import PRESETS, Transformer, model_config  # noqa: E402
from strategies.fragments import fragment_names  # noqa: E402

MIB = 2**20
REPETITIONS = 5  # of the timed steps; the median counts (a shared machine is noisy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="ranks of the larger site (default 2)")
    p.add_argument("--model", default="tiny", choices=[*MODEL_ALIASES, *PRESETS],
                   help="model of the throughput runs (default tiny)")
    p.add_argument("--memory-model", default="35m", choices=[*MODEL_ALIASES, *PRESETS],
                   help="model of the memory runs (default 35m)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repetition (default 10)")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="torch CPU threads of each rank (default 1: a core per rank, the steadiest "
                        "on shared cores)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    return p.parse_args(argv)


def _config(args: argparse.Namespace, model: str, ranks: int, parallelism: str) -> RunConfig:
    return RunConfig.from_mapping(dict(model=model, num_clients=1, batch_size=args.batch_size,
                                       seq_len=args.seq_len, ranks_per_worker=ranks,
                                       parallelism=parallelism, precision=args.precision,
                                       warmup_steps=1, device=args.device))


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def _outer_state_bytes(cfg: RunConfig, model: torch.nn.Module, site: SiteGroup | None) -> int:
    """θ_p and the Nesterov buffer of every fragment as this rank holds them, built as the worker
    builds them: under fsdp its slices, under ddp all of them on rank 0 and none elsewhere."""
    if site is not None and site.rank and not site.sharded:
        return 0
    shapes = {name: param.shape for name, param in model.named_parameters()}  # fsdp: the full shapes
    fragment_keys = fragment_names(shapes, cfg.num_fragments, cfg.fragment_pattern)
    if site is not None and site.sharded:
        fragment_keys = [list(ShardLayout(keys, shapes, site.rank, site.ranks).local_keys.values())
                         for keys in fragment_keys]
        params = site.local_parameters(model)
    else:
        params = dict(model.named_parameters())
    fragments = [Fragment(p, keys, params, cfg.outer_lr, cfg.outer_momentum)
                 for p, keys in enumerate(fragment_keys)]
    return sum(t.nbytes for f in fragments
               for t in (*f.outer.params.values(), *f.outer.momentum_buffer.values()))


def _measure(cfg: RunConfig, device: str, site: SiteGroup | None, steps: int, warmup: int) -> dict:
    """Build one rank's trainer as the worker does, time `steps` inner steps, read its memory."""
    ranks = cfg.ranks_per_worker
    model_cfg = model_config(cfg.model_preset, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    torch.manual_seed(0)
    stream = random_stream(model_cfg.vocab_size, cfg.seq_len, cfg.batch_size * ranks)
    if site is not None:
        stream = RankSlice(stream, site.rank, ranks)
    trainer = InnerTrainer(Transformer(model_cfg), stream, cfg, device, site)
    for _ in range(warmup):
        trainer.train_step()
    trainer.synchronize()
    rates = []
    for _ in range(REPETITIONS):
        if site is not None:
            dist.barrier()
        began = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        trainer.synchronize()
        if site is not None:
            dist.barrier()
        rates.append(steps * cfg.batch_size * ranks * cfg.seq_len / (time.perf_counter() - began))
    moments = [v for state in trainer.optimizer.state.values() for v in state.values() if v.dim()]
    if trainer.on_cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_second": statistics.median(rates),
            "param_and_adamw_mib": (_local_bytes(trainer.model.parameters()) + _local_bytes(moments)) / MIB,
            "outer_state_mib": _outer_state_bytes(cfg, trainer.model, site) / MIB,
            "peak_mib": peak / MIB}


def _rank(rank: int, port: int, cfg_dict: dict, device: str, steps: int, warmup: int, threads: int,
          results) -> None:
    cfg = RunConfig.from_mapping(cfg_dict)
    ranks = cfg.ranks_per_worker
    device = rank_device(device, rank)
    if device == "cpu":
        torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=600)
    store = dist.TCPStore(LOOPBACK, port, ranks, is_master=False, timeout=timeout)
    dist.init_process_group(_backend(device, ranks), store=store, rank=rank, world_size=ranks,
                            timeout=timeout)
    site = SiteGroup(rank, ranks, device, cfg.parallelism == "fsdp")
    measured = _measure(cfg, device, site, steps, warmup)
    results.put({"rank": rank, "device": device, **measured})
    dist.destroy_process_group()


def run_site(cfg: RunConfig, device: str, steps: int, warmup: int, threads: int) -> list[dict]:
    """Per-rank measurements of one site of cfg.ranks_per_worker ranks (1: in this process)."""
    if cfg.ranks_per_worker == 1:
        if device == "cpu":
            torch.set_num_threads(threads)
        return [{"rank": 0, "device": rank_device(device, 0),
                 **_measure(cfg, rank_device(device, 0), None, steps, warmup)}]
    store = dist.TCPStore(LOOPBACK, 0, cfg.ranks_per_worker, is_master=True, wait_for_workers=False)
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(
        _rank, args=(store.port, cfg.to_dict(), device, steps, warmup, threads, results),
        nprocs=cfg.ranks_per_worker, join=True, start_method="spawn")
    return sorted((results.get() for _ in range(cfg.ranks_per_worker)), key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    result: dict = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus,
                    "cpu_cores": os.cpu_count(), "threads_per_rank": args.threads_per_rank,
                    "ranks": args.ranks, "batch_size_per_rank": args.batch_size,
                    "seq_len": args.seq_len, "throughput": {}, "memory": {}}
    if gpus and gpus < args.ranks:
        result["note"] = f"{args.ranks} ranks share {gpus} GPU(s) over gloo: a smoke test, not a speed-up"
    # 1 rank with the per-rank batch, 1 rank with the R-rank site's batch, R ranks.
    runs = ((1, args.batch_size), (1, args.batch_size * args.ranks), (args.ranks, args.batch_size))
    for ranks, batch in runs:
        cfg = _config(args, args.model, ranks, "ddp").replace(batch_size=batch)
        site = run_site(cfg, device, args.steps, args.warmup, args.threads_per_rank)
        key = f"{ranks}_ranks_batch_{batch}_per_rank_tokens_per_second"
        result["throughput"][key] = round(site[0]["tokens_per_second"], 1)
        print(f"{args.model}, {ranks} rank(s) × batch {batch}: {site[0]['tokens_per_second']:,.0f} tokens/s",
              flush=True)
    one, one_same_batch, many = result["throughput"].values()
    result["throughput"]["speedup_vs_1_rank"] = round(many / one, 3)
    result["throughput"]["speedup_vs_1_rank_same_site_batch"] = round(many / one_same_batch, 3)
    for parallelism in ("ddp", "fsdp"):
        site = run_site(_config(args, args.memory_model, args.ranks, parallelism), device, 2, 1,
                        args.threads_per_rank)
        result["memory"][parallelism] = [{k: round(v, 1) if isinstance(v, float) else v
                                          for k, v in r.items() if k != "tokens_per_second"} for r in site]
        for r in site:
            print(f"{args.memory_model} {parallelism} rank {r['rank']}: parameters + AdamW "
                  f"{r['param_and_adamw_mib']:,.1f} MiB, outer state {r['outer_state_mib']:,.1f} MiB, "
                  f"peak {r['peak_mib']:,.1f} MiB", flush=True)
    ddp, fsdp = (sum(r["param_and_adamw_mib"] for r in result["memory"][p]) / args.ranks
                 for p in ("ddp", "fsdp"))
    result["memory"]["fsdp_over_ddp_state_per_rank"] = round(fsdp / ddp, 3)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
