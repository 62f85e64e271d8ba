"""A site: one Flower node's worker trained by `ranks_per_worker` processes as one
torch.distributed group (data-parallel, `parallelism=ddp`).

Rank 0 is the node's worker process itself (clients/worker_process.py): it alone talks to
the ClientApp adapter, keeps the outer state, sends Δ and applies the averages. It starts the
other ranks with `torch.multiprocessing` (spawn) and a TCPStore on the loopback whose port the
OS picks, so no port can clash and nothing outside the machine can join. The elastic launcher
behind `torchrun` would start rank 0 too, but rank 0 is already running (the adapter started
it) and must stay the process that owns the private socket.

The other ranks are followers. Each holds a replica of the model, the AdamW state and its slice
of the site's stream, and does what rank 0 tells it over a small control channel (a gloo group,
CPU tensors, so on GPUs it never waits for the device):

  STEP             one inner step: DistributedDataParallel all-reduces the gradients, so every
                   rank takes the same AdamW step on the mean gradient of the site's batch
  GATHER_FRAGMENT p  send fragment p's slices to rank 0 (fsdp), which assembles Δ or merges
  SET_FRAGMENT p   receive fragment p's parameters after rank 0 applied an outer step to it
                   (ddp: a broadcast; fsdp: each rank receives its slice)
  LOAD_STATE s     receive every parameter and continue the run at inner step s (a prepare)
  SAVE_OPTIMIZER r save this rank's slice of the AdamW moments for round r (fsdp: per-rank files
                   in the node's worker-state directory; under ddp rank 0's file is everyone's)
  LOAD_OPTIMIZER r load the AdamW moments rank 0 restored for round r
  NOOP             a heartbeat while rank 0 waits for an average, so a collective's timeout
                   (round_timeout) only fires when a rank really hangs
  STOP             leave the group and exit

Under DDP every rank's parameters equal rank 0's, so applying the outer step on rank 0 and
broadcasting the fragment is the outer step every rank would take, and rank 0's Δ is the
site's Δ. A rank that dies closes its sockets, so the others' next collective fails at once;
rank 0 then ends its process (a crashed worker, restarted and resynced by the next message) and
each follower also exits as soon as its parent is gone: no orphan ranks.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing

from fl_diloco.config import RunConfig
from fl_diloco.data import BatchStream

STEP, GATHER_FRAGMENT, SET_FRAGMENT, LOAD_STATE, SAVE_OPTIMIZER, LOAD_OPTIMIZER, NOOP, STOP = range(8)
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RankSlice:
    """Rank `rank`'s rows of every batch of the site's stream: disjoint across ranks, and
    together exactly the batch one process would train on with batch_size × ranks."""

    def __init__(self, site_stream: BatchStream, rank: int, ranks: int) -> None:
        self.site_stream = site_stream
        self.batch_size = site_stream.batch_size // ranks
        self._rows = slice(rank * self.batch_size, (rank + 1) * self.batch_size)

    def seek(self, num_batches: int) -> None:
        self.site_stream.seek(num_batches)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.site_stream.next_batch()
        return inputs[self._rows], targets[self._rows]


def rank_device(device: str, rank: int) -> str:
    """Rank i's device: the site's GPU i (of those CUDA_VISIBLE_DEVICES shows; ranks share
    GPUs round-robin when there are fewer), or the CPU."""
    if not device.startswith("cuda"):
        return device
    return f"cuda:{rank % torch.cuda.device_count()}"


def _backend(device: str, ranks: int) -> str:
    # NCCL needs a GPU of its own per rank; gloo also reduces CUDA tensors (a smoke test
    # with several ranks on one GPU).
    if device.startswith("cuda") and torch.cuda.device_count() >= ranks:
        return "nccl"
    return "gloo"


class SiteGroup:
    """This process's membership of its site's group, and the control channel."""

    def __init__(self, rank: int, ranks: int, sharded: bool = False) -> None:
        self.rank, self.ranks = rank, ranks
        self.sharded = sharded  # fsdp: each rank holds a slice of every parameter (dim 0)
        self.control = dist.new_group(backend="gloo")
        self._command = torch.zeros(2, dtype=torch.int64)
        self.processes: list = []  # rank 0: the followers' processes
        self._closing = False

    # ----- the control channel: rank 0 commands, the others receive -----

    def command(self, op: int, arg: int = 0) -> None:
        self._command[0], self._command[1] = op, arg
        dist.broadcast(self._command, src=0, group=self.control)

    def receive(self) -> tuple[int, int]:
        dist.broadcast(self._command, src=0, group=self.control)
        return int(self._command[0]), int(self._command[1])

    def set_parameters(self, model: torch.nn.Module, names: list[str],
                       values: dict[str, torch.Tensor] | None = None) -> None:
        """Every rank takes rank 0's values of the named parameters: `values` under fsdp (full
        tensors, sliced), its model's own under ddp (replicas)."""
        if self.sharded:
            self.scatter_parameters(model, names, values)
        else:
            self.broadcast_parameters(model, names)

    @torch.no_grad()
    def broadcast_parameters(self, model: torch.nn.Module, names: list[str]) -> None:
        """ddp: rank 0's values of the named parameters onto every rank, in one message."""
        named = dict(model.named_parameters())
        tensors = [named[n] for n in names]
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        if self.rank:
            for tensor, value in zip(tensors, flat.split([t.numel() for t in tensors])):
                tensor.copy_(value.view_as(tensor))

    @torch.no_grad()
    def gather_parameters(self, model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """fsdp: the named parameters assembled on rank 0, fp32 on its CPU, one tensor at a
        time (no device ever holds more than one full parameter); {} on the other ranks."""
        named = dict(model.named_parameters())
        full = {}
        for name in names:
            param = named[name]
            rows = _shard_rows(param.shape[0], self.ranks)
            padded = _padded(param.to_local().detach(), max(rows))
            pieces = [torch.empty_like(padded) for _ in rows] if self.rank == 0 else None
            dist.gather(padded, pieces, dst=0)
            if self.rank == 0:
                full[name] = torch.cat([p[:n].float().cpu() for p, n in zip(pieces, rows)])
        return full

    @torch.no_grad()
    def scatter_parameters(self, model: torch.nn.Module, names: list[str],
                           values: dict[str, torch.Tensor] | None = None) -> None:
        """fsdp: rank 0's full `values` of the named parameters, each rank getting its slice."""
        named = dict(model.named_parameters())
        for name in names:
            local = named[name].to_local()
            rows = _shard_rows(named[name].shape[0], self.ranks)
            received = torch.empty((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
            pieces = None
            if self.rank == 0:
                pieces = [_padded(p, max(rows)).to(local.device, local.dtype)
                          for p in values[name].split(rows)]
            dist.scatter(received, pieces, src=0)
            local.copy_(received[:local.shape[0]])

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call `on_failure` (once) if a follower exits while the site is not closing."""
        def poll() -> None:
            while not self._closing:
                for rank, process in enumerate(self.processes, start=1):
                    if process.exitcode is not None and not self._closing:
                        on_failure(f"rank {rank} (pid {process.pid}) exited with code {process.exitcode}")
                        return
                time.sleep(0.5)
        threading.Thread(target=poll, name="site-watch", daemon=True).start()

    def close(self) -> None:
        """Tell the followers to leave and wait for them (rank 0); kill any that does not."""
        self._closing = True
        try:
            self.command(STOP)
        except Exception:  # noqa: BLE001 - a broken group: the kill below ends the followers
            pass
        for process in self.processes:
            process.join(timeout=10)
        self.kill()
        dist.destroy_process_group()

    def abort(self) -> None:
        """End the followers and leave the group without a word (it is broken)."""
        self.kill()
        dist.destroy_process_group()

    def kill(self) -> None:
        """End every follower now (rank 0 is exiting)."""
        self._closing = True
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


def _shard_rows(rows: int, ranks: int) -> list[int]:
    """How FSDP2 splits dim 0 across ranks: torch.chunk's pieces, empty ones at the end."""
    sizes = [len(c) for c in torch.empty(rows, 0).chunk(ranks)]
    return sizes + [0] * (ranks - len(sizes))


def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` (collectives need equal sizes)."""
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[:len(tensor)] = tensor
    return out


def _timeout(cfg: RunConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=cfg.round_timeout)


def start_site(cfg: RunConfig, partition: tuple[int, int], device: str) -> SiteGroup:
    """Rank 0: start ranks 1..R−1 and join them in one group."""
    ranks = cfg.ranks_per_worker
    store = dist.TCPStore(LOOPBACK, 0, ranks, is_master=True, timeout=_timeout(cfg),
                          wait_for_workers=False)
    context = torch.multiprocessing.start_processes(
        _follower_main, args=(store.port, cfg.to_dict(), partition, device, os.getpid()),
        nprocs=ranks - 1, join=False, start_method="spawn")
    dist.init_process_group(_backend(device, ranks), store=store, rank=0, world_size=ranks,
                            timeout=_timeout(cfg))
    site = SiteGroup(0, ranks, cfg.parallelism == "fsdp")
    site.processes = list(context.processes)
    return site


def _exit_with_parent(parent_pid: int) -> None:
    """A follower never outlives rank 0, however rank 0 ended.

    torch.multiprocessing asks the kernel to interrupt a child when the *thread* that started
    it ends, and rank 0 starts its site from the thread serving a prepare request, which ends
    at once. So that signal is switched off; this watch of the parent process replaces it.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 0)

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        print(f"rank pid {os.getpid()}: rank 0 (pid {parent_pid}) is gone, exiting", flush=True)
        os._exit(1)
    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def _follower_main(index: int, *args) -> None:
    try:
        _follow(index + 1, *args)
    except Exception:  # torch.multiprocessing would keep the traceback to itself
        print(f"rank {index + 1} (pid {os.getpid()}) failed:\n{traceback.format_exc()}", flush=True)
        os._exit(1)


def _follow(rank: int, port: int, cfg_dict: dict, partition: tuple[int, int], device: str,
            parent_pid: int) -> None:
    from clients.worker import (  # clients.worker imports this module
        build_trainer, save_optimizer, saved_optimizer, worker_threads)
    from clients.fragment import parameter_names
    from strategies.fragments import fragment_names

    _exit_with_parent(parent_pid)
    cfg = RunConfig.from_mapping(cfg_dict)
    ranks = cfg.ranks_per_worker
    device = rank_device(device, rank)
    if device == "cpu":
        torch.set_num_threads(worker_threads(cfg))
    store = dist.TCPStore(LOOPBACK, port, ranks, is_master=False, timeout=_timeout(cfg))
    dist.init_process_group(_backend(device, ranks), store=store, rank=rank, world_size=ranks,
                            timeout=_timeout(cfg))
    site = SiteGroup(rank, ranks, cfg.parallelism == "fsdp")
    trainer = build_trainer(cfg, *partition, device, site)
    shapes = {n: p.shape for n, p in trainer.model.named_parameters()}  # fsdp: the full shapes
    fragments = [parameter_names(keys) for keys in fragment_names(shapes, cfg.num_fragments,
                                                                  cfg.fragment_pattern)]
    trainer.model.train()
    while True:
        op, arg = site.receive()
        if op == STEP:
            trainer.train_step()
        elif op == GATHER_FRAGMENT:
            site.gather_parameters(trainer.model, fragments[arg])
        elif op == SET_FRAGMENT:
            site.set_parameters(trainer.model, fragments[arg])
        elif op == LOAD_STATE:
            site.set_parameters(trainer.model, list(shapes))
            trainer.start_at(arg)
        elif op == SAVE_OPTIMIZER:
            save_optimizer(trainer, cfg, partition[0], arg, rank)
        elif op == LOAD_OPTIMIZER:
            trainer.load_optimizer(saved_optimizer(cfg, partition[0], arg, rank if site.sharded else 0))
        elif op == STOP:
            break
    dist.destroy_process_group()
