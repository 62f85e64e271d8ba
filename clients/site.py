"""A site: one Flower node's worker trained by `ranks_per_worker` processes as one
torch.distributed group (data-parallel, `parallelism=ddp`, or sharded, `parallelism=fsdp`).

Rank 0 is the node's worker process itself (clients/worker_process.py): it alone talks to
the ClientApp adapter, sends Δ and receives the averages. It starts the
other ranks with `torch.multiprocessing` (spawn) and a TCPStore on the loopback whose port the
OS picks, so no port can clash and nothing outside the machine can join. The elastic launcher
behind `torchrun` would start rank 0 too, but rank 0 is already running (the adapter started
it) and must stay the process that owns the private socket.

The other ranks are followers. Each holds a replica of the model, the AdamW state and its slice
of the site's stream, and does what rank 0 tells it over a small control channel (a gloo group,
CPU tensors, so on GPUs it never waits for the device):

  STEP             one inner step: DistributedDataParallel all-reduces the gradients, so every
                   rank takes the same AdamW step on the mean gradient of the site's batch
  SEND_DELTA p     fsdp: send Δ of this rank's rows of fragment p to rank 0, which encodes it
  SET_FRAGMENT p   ddp: receive fragment p's parameters after rank 0 applied an outer step to it
  OUTER_STEP p     fsdp: receive this rank's rows of round r's average, take the outer step
                   (and the α-merge) on them
  EAGER_STEP p r k counted M   fsdp: receive this rank's rows of the decoded Δ_m(r) and of the
                   stale average Δ(k), take the delayed/eager step on them
  LOAD_STATE s m   receive every parameter (fsdp: this rank's slice of θ, and of the outer
                   momentum when m) and continue the run at inner step s (a prepare)
  SAVE_OPTIMIZER r save this rank's slice of the AdamW moments for round r (fsdp: per-rank files
                   in the node's worker-state directory; under ddp rank 0's file is everyone's)
  LOAD_OPTIMIZER r load the AdamW moments rank 0 restored for round r
  NOOP             a heartbeat while rank 0 waits for an average, so a collective's timeout
                   (round_timeout) only fires when a rank really hangs
  STOP             leave the group and exit

Under DDP every rank's parameters equal rank 0's, so rank 0 alone keeps the outer state:
applying the outer step on rank 0 and broadcasting the fragment is the outer step every rank
would take, and rank 0's Δ is the site's Δ. Under FSDP every rank keeps the outer state of the
rows its parameter slices hold (ShardLayout) and steps them itself; the math is elementwise,
so each element goes through the same operations as in one process.

A rank that dies closes its sockets, so the others' next collective fails at once; rank 0 then
ends its process (a crashed worker, restarted and resynced by the next message) and each
follower also exits as soon as its parent is gone: no orphan ranks.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing

from clients.fragment import Fragment, parameter_names
from fl_diloco.config import RunConfig
from fl_diloco.data import BatchStream
from strategies.fragments import fragment_names, parse_key
from strategies.outer_optimizer import Tensors

(STEP, SEND_DELTA, SET_FRAGMENT, OUTER_STEP, EAGER_STEP, LOAD_STATE, SAVE_OPTIMIZER, LOAD_OPTIMIZER,
 NOOP, STOP) = range(10)
MAX_COMMAND_ARGS = 5  # EAGER_STEP's: fragment, round, stale round, counted, participants
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


class ShardLayout:
    """Where the rows of some keys (parameter names or row ranges of them, as fragments name
    them: strategies/fragments.py) lie across a site's ranks under fsdp: in FSDP2's dim-0
    slices of each parameter, so a rank's outer state is the rows its parameters hold."""

    def __init__(self, keys: list[str], shapes: Mapping[str, torch.Size], rank: int, ranks: int) -> None:
        self.shapes: dict[str, torch.Size] = {}  # each key's full shape (what goes on the wire)
        self.rows: dict[str, list[int]] = {}  # each key's rows on rank 0, 1, …
        self.local_keys: dict[str, str] = {}  # each key's rows inside this rank's slice
        for key in keys:
            name, rows = parse_key(key)
            start, stop, _ = rows.indices(shapes[name][0])
            self.shapes[key] = torch.Size((stop - start, *shapes[name][1:]))
            self.rows[key] = []
            first = 0  # the slice of rank r holds the parameter's rows [first, first + size)
            for r, size in enumerate(_shard_rows(shapes[name][0], ranks)):
                # The key's rows clamped into the slice: in order, so never a negative count.
                lo, hi = (min(max(i, first), first + size) for i in (start, stop))
                self.rows[key].append(hi - lo)
                if r == rank:
                    self.local_keys[key] = f"{name}[{lo - first}:{hi - first}]"
                first += size


class SiteGroup:
    """This process's membership of its site's group, and the control channel."""

    def __init__(self, rank: int, ranks: int, device: str, sharded: bool = False) -> None:
        self.rank, self.ranks = rank, ranks
        self.device = device  # where this rank's collectives run (NCCL reduces device tensors only)
        self.sharded = sharded  # fsdp: each rank holds a slice of every parameter (dim 0)
        self.control = dist.new_group(backend="gloo")
        self._command = torch.zeros(1 + MAX_COMMAND_ARGS, dtype=torch.int64)
        self.processes: list = []  # rank 0: the followers' processes
        self._closing = False

    # ----- the control channel: rank 0 commands, the others receive -----

    def command(self, op: int, *args: int) -> None:
        self._command.zero_()
        self._command[:1 + len(args)] = torch.tensor([op, *args])
        dist.broadcast(self._command, src=0, group=self.control)

    def receive(self) -> list[int]:
        """The next command: its op, then its MAX_COMMAND_ARGS arguments (0 where not given)."""
        dist.broadcast(self._command, src=0, group=self.control)
        return self._command.tolist()

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

    def local_parameters(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """fsdp: this rank's slice of every parameter (views: writing them writes the model)."""
        return {name: param.to_local() for name, param in model.named_parameters()}

    @torch.no_grad()
    def gather(self, local: Mapping[str, torch.Tensor], layout: ShardLayout) -> Tensors:
        """fsdp: the ranks' slices of the layout's keys (`local`: this rank's, by local key)
        assembled on rank 0, fp32 on its CPU, one key at a time, so no device ever holds more
        than one full tensor; {} on the other ranks."""
        full = {}
        for key, rows in layout.rows.items():
            padded = _padded(local[layout.local_keys[key]].float(), max(rows)).to(self.device)
            pieces = [torch.empty_like(padded) for _ in rows] if self.rank == 0 else None
            dist.gather(padded, pieces, dst=0)
            if self.rank == 0:
                full[key] = torch.cat([p[:n].cpu() for p, n in zip(pieces, rows)])
        return full

    @torch.no_grad()
    def scatter(self, full: Mapping[str, torch.Tensor] | None, layout: ShardLayout) -> Tensors:
        """fsdp: rank 0's `full` values of the layout's keys (None on the other ranks), each
        rank receiving its slice, fp32 on its CPU, by local key."""
        local = {}
        for key, rows in layout.rows.items():
            received = torch.empty((max(rows), *layout.shapes[key][1:]), device=self.device)
            pieces = None
            if self.rank == 0:
                pieces = [_padded(p, max(rows)).to(self.device)
                          for p in torch.as_tensor(full[key]).float().split(rows)]
            dist.scatter(received, pieces, src=0)
            local[layout.local_keys[key]] = received[:rows[self.rank]].cpu()
        return local

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
        self.abort()

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


# ----- fsdp: each rank's slice of the outer state; rank 0 and the followers call the same -----

def load_sharded_state(site: SiteGroup, model: torch.nn.Module, fragment_keys: list[list[str]],
                       cfg: RunConfig, params: Mapping | None = None, momentum: Mapping | None = None,
                       with_momentum: bool = False) -> tuple[list[Fragment], list[ShardLayout]]:
    """Every rank takes its slice of rank 0's θ (`params`, by parameter name) into its model and
    its fragments' outer parameters, and on a resume its slice of the outer momentum (by
    fragment key). Returns this rank's fragments and where their keys' rows lie."""
    shapes = {name: param.shape for name, param in model.named_parameters()}  # the full shapes
    sliced = site.scatter(params, ShardLayout(list(shapes), shapes, site.rank, site.ranks))
    values = {parse_key(key)[0]: value for key, value in sliced.items()}
    with torch.no_grad():
        for name, local in site.local_parameters(model).items():
            local.copy_(values[name])
    layouts = [ShardLayout(keys, shapes, site.rank, site.ranks) for keys in fragment_keys]
    fragments = [Fragment(p, list(layout.local_keys.values()), values, cfg.outer_lr, cfg.outer_momentum)
                 for p, layout in enumerate(layouts)]
    if with_momentum:
        for fragment, layout in zip(fragments, layouts):
            for key, buffer in site.scatter(momentum, layout).items():
                fragment.outer.momentum_buffer[key].copy_(buffer)
    return fragments, layouts


def sharded_outer_gradient(site: SiteGroup, fragment: Fragment, layout: ShardLayout,
                           model: torch.nn.Module) -> Tensors:
    """Each rank's Δ of its slice of `fragment`, assembled on rank 0 ({} on the others)."""
    return site.gather(fragment.outer_gradient(site.local_parameters(model)), layout)


def sharded_outer_step(site: SiteGroup, fragment: Fragment, layout: ShardLayout, model: torch.nn.Module,
                       mixing: float, average: Tensors | None = None) -> None:
    """Each rank's outer step (and α-merge) on its slice of `fragment`, with its slice of
    rank 0's `average`."""
    fragment.apply(site.scatter(average, layout), site.local_parameters(model), mixing)


def sharded_eager_step(site: SiteGroup, fragment: Fragment, layout: ShardLayout, model: torch.nn.Module,
                       rounds: tuple[int, int], counted: bool, weight: float,
                       sent: Tensors | None = None, stale_average: Tensors | None = None) -> None:
    """Each rank's delayed/eager step (Fragment.eager_step) on its slice of `fragment`, with its
    slices of rank 0's decoded outer gradient `sent` and `stale_average`."""
    fragment.eager_step(*rounds, site.scatter(sent, layout), site.scatter(stale_average, layout), counted,
                        weight, site.local_parameters(model))


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
    site = SiteGroup(0, ranks, rank_device(device, 0), cfg.parallelism == "fsdp")
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
        build_trainer, eager_weight, save_optimizer, saved_optimizer, worker_threads)

    _exit_with_parent(parent_pid)
    cfg = RunConfig.from_mapping(cfg_dict)
    ranks = cfg.ranks_per_worker
    device = rank_device(device, rank)
    if device == "cpu":
        torch.set_num_threads(worker_threads(cfg))
    store = dist.TCPStore(LOOPBACK, port, ranks, is_master=False, timeout=_timeout(cfg))
    dist.init_process_group(_backend(device, ranks), store=store, rank=rank, world_size=ranks,
                            timeout=_timeout(cfg))
    site = SiteGroup(rank, ranks, device, cfg.parallelism == "fsdp")
    trainer = build_trainer(cfg, *partition, device, site)
    model = trainer.model
    shapes = {n: p.shape for n, p in model.named_parameters()}  # fsdp: the full shapes
    fragment_keys = fragment_names(shapes, cfg.num_fragments, cfg.fragment_pattern)
    fragments, layouts = [], []  # fsdp: this rank's slices of the outer state, and where they lie
    model.train()
    while True:
        op, *args = site.receive()
        if op == STEP:
            trainer.train_step()
        elif op == SEND_DELTA:
            sharded_outer_gradient(site, fragments[args[0]], layouts[args[0]], model)
        elif op == SET_FRAGMENT:
            site.broadcast_parameters(model, parameter_names(fragment_keys[args[0]]))
        elif op == OUTER_STEP:
            sharded_outer_step(site, fragments[args[0]], layouts[args[0]], model, cfg.mixing)
        elif op == EAGER_STEP:
            p, server_round, stale, counted, participants = args
            sharded_eager_step(site, fragments[p], layouts[p], model, (server_round, stale), bool(counted),
                               eager_weight(cfg, participants, partition[1]))
        elif op == LOAD_STATE:
            step, with_momentum = args[:2]
            if site.sharded:
                fragments, layouts = load_sharded_state(site, model, fragment_keys, cfg,
                                                        with_momentum=bool(with_momentum))
            else:
                site.broadcast_parameters(model, list(shapes))
            trainer.start_at(step)
        elif op == SAVE_OPTIMIZER:
            save_optimizer(trainer, cfg, partition[0], args[0], rank)
        elif op == LOAD_OPTIMIZER:
            trainer.load_optimizer(saved_optimizer(cfg, partition[0], args[0], rank if site.sharded else 0))
        elif op == STOP:
            break
    dist.destroy_process_group()
