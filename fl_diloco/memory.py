"""How much memory a run needs, how much the machine has, and the check that compares them.

A run that cannot fit is otherwise killed by the kernel's OOM killer tens of seconds in, with no
message, and may leave Ray's processes behind. This estimate, in bytes, is what the check uses
and what `bench/worker_memory.py` tabulates. Per worker, with N parameters, L blocks of width d,
a vocabulary of V and t = micro_batch_size × seq_len tokens per forward/backward:

    training state   (4 + 4 + 8)·N      fp32 weights, fp32 gradients, AdamW's two fp32 moments
                     + 2·N under bf16 autocast (its bf16 copy of every weight)
    activations      t · (a·d·L + 4.4·V)    what autograd keeps for the backward: a = 62 under
                     bf16 autocast, 94 in fp32, per block and token; 4.4·V for the logits and
                     their fp32 softmax
    loss backward    t · b·V             the logits' gradients: b = 6 under bf16, 8 in fp32
    outer state      8·N                 θ and the Nesterov buffer, always in host memory
    CUDA context     1 GiB               on a GPU: the context and the allocator's slack

A site of R ranks (ranks_per_worker, clients/site.py) needs the training state, activations and
context once per rank (each on its own device; all in host memory on a CPU) and the outer state
once: on rank 0 under ddp; under fsdp 1/R of it on each rank, sliced like the parameters (the
same host memory in all when the ranks share a machine). Under fsdp each rank also holds 1/R of
the training state (FSDP2 also gathers one block's weights at a time for its forward and
backward: not counted, a block is small).

The activation constants are the largest that `bench/worker_memory.py`'s way of counting (the
bytes autograd saves, with saved-tensor hooks) measured on the tiny-1m, 35m and 100m presets,
rounded up (a per block and token: 57-61 under bf16, 87-93 in fp32, highest for the narrowest
model; tests/test_startup.py checks the bound).
The server holds about 16·N (θ, its Nesterov buffer, the evaluation model and the running
average of outer gradients). Not counted: the Python interpreter and libraries each process
loads (a few hundred MB, mostly shared pages) and the corpus, so the check refuses only runs
that cannot fit, never one that merely might not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fl_diloco.config import ConfigError, RunConfig, resolve_device, resolve_precision

GIB = 2**30
TRAINING_STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weights, fp32 gradients, AdamW moments
AUTOCAST_COPY_BYTES_PER_PARAM = 2  # bf16 autocast's copy of each weight
OUTER_STATE_BYTES_PER_PARAM = 8  # θ and the outer Nesterov buffer, fp32, in host memory
SERVER_BYTES_PER_PARAM = 16  # θ, momentum, the evaluation model, the running average
ACTIVATION_BYTES_PER_BLOCK_TOKEN = {"bf16": 62, "fp32": 94}  # × d_model
ACTIVATION_BYTES_OUTSIDE_BLOCKS = 4.4  # × vocab, per token
LOSS_BACKWARD_BYTES_PER_LOGIT = {"bf16": 6, "fp32": 8}
CUDA_CONTEXT_BYTES = 1 * GIB


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's bytes on its GPU (0 for a CPU worker) and in host memory."""

    device: float
    host: float


def worker_memory(n_params: int, n_layers: int, d_model: int, vocab_size: int, micro_tokens: int,
                  precision: str, on_cuda: bool, ranks: int = 1, sharded: bool = False) -> WorkerMemory:
    """The estimate of the module docstring for one worker training `micro_tokens` tokens per
    forward/backward in `precision` ("bf16" or "fp32"), on `ranks` processes (`sharded`: fsdp);
    `device` is per rank."""
    autocast_copy = AUTOCAST_COPY_BYTES_PER_PARAM if precision == "bf16" else 0
    state = (TRAINING_STATE_BYTES_PER_PARAM + autocast_copy) * n_params / (ranks if sharded else 1)
    per_token = (ACTIVATION_BYTES_PER_BLOCK_TOKEN[precision] * d_model * n_layers
                 + (ACTIVATION_BYTES_OUTSIDE_BLOCKS + LOSS_BACKWARD_BYTES_PER_LOGIT[precision]) * vocab_size)
    training = state + micro_tokens * per_token
    outer = OUTER_STATE_BYTES_PER_PARAM * n_params  # the site's, on its one machine (ddp: rank 0's)
    if on_cuda:
        return WorkerMemory(device=training + CUDA_CONTEXT_BYTES, host=outer)
    return WorkerMemory(device=0.0, host=ranks * training + outer)


def run_worker_memory(cfg: RunConfig) -> tuple[WorkerMemory, int]:
    """The estimate for one worker of `cfg`, and the model's parameter count."""
    from fl_diloco.model import count_parameters, model_config

    device = resolve_device(cfg.device)
    model = model_config(cfg.model_preset, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    n_params = count_parameters(model)
    micro_tokens = (cfg.micro_batch_size or cfg.batch_size) * cfg.seq_len
    need = worker_memory(n_params, model.n_layers, model.d_model, model.vocab_size, micro_tokens,
                         resolve_precision(cfg.precision, device), device.startswith("cuda"),
                         cfg.ranks_per_worker, cfg.parallelism == "fsdp")
    return need, n_params


def available_host_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
                          ) -> tuple[float, str]:
    """Bytes this process can still allocate, and where the figure comes from: the kernel's
    MemAvailable, or less where a cgroup (a container's memory limit) allows less."""
    available, source = math.inf, "unknown"
    meminfo = _read(proc / "meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            available, source = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    for limit_file, usage_file, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                                 ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
        group = _cgroup_dir(proc, cgroup_root, limit_file)
        if group is None:
            continue
        limit, usage = _read(group / limit_file), _read(group / usage_file)
        if not limit or not usage or not limit.strip().isdigit() or int(limit) >= 2**60:
            continue  # "max", or v1's "no limit" (a huge number)
        stat = dict(line.split() for line in (_read(group / "memory.stat") or "").splitlines() if " " in line)
        # Page cache in the group is reclaimed before the limit kills anything.
        left = int(limit) - int(usage) + int(stat.get(inactive_key, 0))
        if left < available:
            available, source = left, f"the cgroup limit {group / limit_file} ({int(limit) / GIB:.1f} GiB)"
    return available, source


def _cgroup_dir(proc: Path, cgroup_root: Path, limit_file: str) -> Path | None:
    """This process's memory cgroup directory that holds `limit_file`, if any."""
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "memory") or "memory" in controllers.split(","):
            base = cgroup_root if controllers == "" else cgroup_root / "memory"
            for candidate in (base / path.lstrip("/"), base):
                if (candidate / limit_file).exists():
                    return candidate
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def check_memory(cfg: RunConfig, workers_here: int, server_here: bool = True) -> None:
    """Refuse a run whose `workers_here` workers (and its server, with `server_here`) cannot fit
    in what this machine has; raises ConfigError with the numbers and what to lower."""
    if workers_here < 1:
        return
    need, n_params = run_worker_memory(cfg)
    device = resolve_device(cfg.device)
    server = SERVER_BYTES_PER_PARAM * n_params if server_here else 0
    host_need = workers_here * need.host + server
    advice = ("lower num_clients, micro_batch_size (batch_size stays) or seq_len, or pick a smaller "
              "model (estimate: fl_diloco/memory.py)")
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if workers_here * need.device > free:
            raise ConfigError(
                f"model={cfg.model} needs ~{need.device / GIB:.1f} GiB of {device} memory per worker "
                f"× {workers_here} workers = {workers_here * need.device / GIB:.1f} GiB; {device} has "
                f"{free / GIB:.1f} GiB free; {advice}")
    available, source = available_host_memory()
    if host_need > available:
        server_part = f" + {server / GIB:.1f} GiB for the server" if server_here else ""
        raise ConfigError(
            f"model={cfg.model} needs ~{need.host / GIB:.1f} GiB of memory per worker × {workers_here} "
            f"workers{server_part} = {host_need / GIB:.1f} GiB; this machine has {available / GIB:.1f} "
            f"GiB available ({source}); {advice}")
