"""A node's persistent worker: trains without pause, and exchanges outer gradients on the side.

The worker holds the model, the AdamW state and the data position for the whole run
(docs/algorithms.md#flower-constraints).
Its inner loop runs in a thread of its own, walking the run's schedule of inner steps:

  at the sync step of round r (r·H/P)     send Δ_{m,p}(r) for fragment p(r) and go straight on
  diloco:  τ steps later                   wait for round r's average Δ(r), apply it
  delayed / eager:  at the same step       wait for round k = r − d·P's average, apply the
                                           delayed or eager update (strategies.outer_optimizer)

The Flower side only feeds it: each `train` request (one per round, from the ClientApp
adapter) delivers the average the server sends with it and returns Δ(r) once the inner loop
has produced it. So the worker computes while its outer gradient is in flight, and waits
only when an average it needs has not arrived; those waits are its idle seconds.

A worker that starts late (its process crashed and the node started a new one, or the whole
run resumed from a checkpoint) is prepared with the server's state after some round r instead
of θ(0): θ, the outer momentum, the averages it still has to apply, and its position in the
run (inner step r·H/P, the data stream fast-forwarded to it). Its AdamW moments come from
the node's own save of that round when there is one (a resumed run), else they start afresh.
Until that state arrives it answers train requests with `needs_state`.

Requests and replies are plain dicts of numpy arrays and numbers, so this class can be driven
directly in tests without any process or socket.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.fragment import Fragment, parameter_names
from clients.inner_loop import InnerTrainer, mean_loss
from clients.progress import ProgressPublisher
from clients.site import (EAGER_STEP, LOAD_OPTIMIZER, LOAD_STATE, NOOP, OUTER_STEP, SAVE_OPTIMIZER,
                          SEND_DELTA, SET_FRAGMENT, STEP, RankSlice, ShardLayout, SiteGroup,
                          load_sharded_state, rank_device, sharded_eager_step, sharded_outer_gradient,
                          sharded_outer_step, start_site)
from fl_diloco import round_events
from fl_diloco.config import RunConfig, resolve_device
from fl_diloco.data import BatchStream, Corpus, load_corpus
from fl_diloco.flops import mfu
from fl_diloco.memory import check_memory
from fl_diloco.model import Transformer, model_config
from strategies.codecs import decode_tensors, encode_tensors
from strategies.fragments import fragment_names, round_fragment, stale_round
from strategies.outer_optimizer import Tensors


def worker_threads(cfg: RunConfig) -> int:
    """Torch threads per worker (per rank of a site): the machine's cores shared among the
    co-located workers' ranks."""
    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    return max(1, (os.cpu_count() or 1) // (cfg.num_clients * cfg.ranks_per_worker))


def eager_weight(cfg: RunConfig, participants: int, num_partitions: int) -> float:
    """1/M for eager (0 for delayed), M = the participants of the latest average: this
    round's own count is not known until its average comes back."""
    if cfg.algorithm != "eager":
        return 0.0
    return 1.0 / (participants or num_partitions)


def optimizer_state_dir(cfg: RunConfig, partition_id: int, rank: int = 0) -> Path:
    """Where a node keeps its worker's AdamW moments at checkpoint rounds, so that a resumed
    run continues exactly: node-local (never sent), keyed by the run's out_dir and partition.
    Under fsdp each rank of the site keeps its own slice of them (rank r > 0 in `rank-r/`)."""
    root = Path(os.environ.get("FL_DILOCO_CACHE") or "~/.cache/fl-diloco").expanduser()
    run_key = hashlib.sha256(cfg.out_dir.encode()).hexdigest()[:16]
    directory = root / "worker-state" / run_key / f"partition-{partition_id}"
    return directory / f"rank-{rank}" if rank else directory


def _optimizer_file(directory: Path, server_round: int) -> Path:
    return directory / f"round-{server_round:06d}.pt"


def saved_optimizer(cfg: RunConfig, partition_id: int, server_round: int, rank: int = 0) -> Path:
    """The node's save of its worker's AdamW moments at `server_round`."""
    return _optimizer_file(optimizer_state_dir(cfg, partition_id, rank), server_round)


def save_optimizer(trainer: InnerTrainer, cfg: RunConfig, partition_id: int, server_round: int,
                   rank: int = 0) -> None:
    """Save the AdamW moments of a checkpoint round; drop the older saves."""
    directory = optimizer_state_dir(cfg, partition_id, rank)
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_optimizer(_optimizer_file(directory, server_round))
    # One more than the server keeps: the server may die before writing this round's.
    saved = sorted(directory.glob("round-*.pt"))
    for old in saved[:-(cfg.keep_checkpoints + 1)]:
        old.unlink(missing_ok=True)


def worker_stream(cfg: RunConfig, corpus: Corpus, partition_id: int, num_partitions: int) -> BatchStream:
    """Worker `partition_id`'s batches: its own shard, walked in its own reproducible order
    (the whole site's batches: batch_size sequences for each of its ranks)."""
    return BatchStream(corpus.train_sequences(partition_id, num_partitions),
                       cfg.batch_size * cfg.ranks_per_worker, seed=cfg.seed * 1000 + partition_id)


def build_trainer(cfg: RunConfig, partition_id: int, num_partitions: int, device: str,
                  site: SiteGroup | None = None) -> InnerTrainer:
    """The worker's resident state: its shard's stream, the model and the inner optimizer
    (one rank's share of them when `site` is given)."""
    corpus = load_corpus(cfg.data_config())
    stream = worker_stream(cfg, corpus, partition_id, num_partitions)
    if site is not None:
        stream = RankSlice(stream, site.rank, site.ranks)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(cfg.model_preset, vocab_size=corpus.vocab_size, seq_len=cfg.seq_len))
    return InnerTrainer(model, stream, cfg, device, site)


class WorkerStopped(RuntimeError):
    """The worker was shut down while its inner loop waited."""


class _RoundMeter:
    """Losses, compute and idle seconds of the inner steps since the last sync.

    The losses stay on the trainer's device until the round's reply reads them all at once.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.compute_seconds = 0.0
        self.idle_seconds = 0.0


class Worker:
    def __init__(self) -> None:
        self.trainer: InnerTrainer | None = None
        self.cfg: RunConfig | None = None
        self.partition: tuple[int, int] | None = None
        self.fragments: list[Fragment] = []  # fsdp: rank 0's slices of them
        self.layouts: list[ShardLayout] = []  # fsdp: where each fragment's rows lie across the ranks
        self.start_round = 0  # the last round that closed before this worker began training
        self._state = threading.Condition()
        # round → (average, whether our outer gradient was counted in it, its participants)
        self._averages: dict[int, tuple[Tensors, bool, int]] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        self._failure: str | None = None
        self._stopping = False
        self._generation = 0  # bumped to end the running inner loop (a restart from new state)
        self._inner_loop: threading.Thread | None = None
        self._progress: ProgressPublisher | None = None
        self.site: SiteGroup | None = None  # ranks_per_worker > 1: this is rank 0 of the group
        # Called when the site's group breaks: the worker process ends itself, so that the
        # next message starts a fresh group (clients/worker_process.py).
        self.on_site_failure: Callable[[str], None] | None = None

    # ----- requests from the ClientApp adapter (any thread) -----

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve one request; failures come back as {"error": traceback}, never as a crash."""
        try:
            kind = request.get("kind")
            if kind == "ping":
                return {"ok": True, "pid": os.getpid()}
            if kind == "prepare":
                self.prepare(request)
                return {"ok": True}
            if kind == "train":
                return self.train(request)
            if kind == "shutdown":  # the run is over: nothing will resume it
                self.stop()
                self.close_site()
                if self.cfg is not None:
                    shutil.rmtree(optimizer_state_dir(self.cfg, self.partition[0]), ignore_errors=True)
                return {"ok": True}
            return {"error": f"unknown request kind {kind!r}"}
        except Exception:  # noqa: BLE001 - the adapter reports it with the node id
            return {"error": traceback.format_exc()}

    def prepare(self, request: dict[str, Any]) -> None:
        """Take the server's state and start training at once.

        The state is θ(0) at the start of a run; after round r (a worker that restarted or
        missed messages, or every worker of a resumed run) it also has `start_round` r, the
        outer `momentum` and the `pending` averages {round: (average, participants)}. A worker
        that is already training restarts from such a state (it was out of step, or the server
        would not have sent it); a repeated θ(0) changes nothing.
        """
        start_round = int(request.get("start_round", 0))
        with self._state:
            partition = (int(request["partition_id"]), int(request["num_partitions"]))
            if self.trainer is not None:
                if partition != self.partition:
                    raise ValueError(f"worker holds partition {self.partition} but was asked for {partition}")
                if not start_round:
                    return  # a retried first prepare: already running
                self._generation += 1  # ends the running inner loop at its next check
                self._state.notify_all()
            running = self._inner_loop
        if running is not None:
            running.join()
        with self._state:
            if self.trainer is None:
                cfg = RunConfig.from_mapping(request["run_config"])
                device = resolve_device(request.get("device") or cfg.device)
                if device == "cpu":
                    torch.set_num_threads(worker_threads(cfg))
                # A node elsewhere has its own memory: refuse with the numbers, not by OOM.
                check_memory(cfg.replace(device=device), workers_here=1, server_here=False)
                if cfg.ranks_per_worker > 1:
                    self.site = start_site(cfg, partition, device)
                    device = rank_device(device, 0)
                try:
                    self.trainer = build_trainer(cfg, *partition, device, self.site)
                except Exception:
                    if self.site is not None:  # a later prepare starts a fresh group
                        self.site.abort()
                        self.site = None
                    raise
                if self.site is not None and self.on_site_failure is not None:
                    self.site.watch(self.on_site_failure)
                self.cfg, self.partition = cfg, partition
                self._progress = ProgressPublisher(optimizer_state_dir(cfg, partition[0]))
            cfg, trainer = self.cfg, self.trainer
            initial, momentum = request["params"], request.get("momentum")
            shapes = {n: p.shape for n, p in trainer.model.named_parameters()}  # fsdp: the full shapes
            names = fragment_names(shapes, cfg.num_fragments, cfg.fragment_pattern)
            self.start_round = start_round
            self._averages.clear()
            self._replies.clear()
            self._failure = None
            trainer.start_at(start_round * cfg.sync_interval)
            if self.site is not None:
                self.site.command(LOAD_STATE, trainer.step, bool(start_round))
            if self.sharded:  # each rank takes its slice of θ and of the outer state
                self.fragments, self.layouts = load_sharded_state(self.site, trainer.model, names, cfg,
                                                                  initial, momentum, bool(start_round))
            else:  # rank 0 keeps the outer state; a ddp site's ranks take its parameters
                trainer.load_parameters(initial)
                self.fragments = [Fragment(p, group, initial, cfg.outer_lr, cfg.outer_momentum)
                                  for p, group in enumerate(names)]
                if self.site is not None:
                    self.site.broadcast_parameters(trainer.model, list(shapes))
            if not start_round:  # a new run: moments saved under its out_dir are an older run's
                for saved in optimizer_state_dir(cfg, partition[0]).glob("**/round-*.pt"):
                    saved.unlink(missing_ok=True)
            else:
                self._restore_optimizer(start_round)
                if not self.sharded:
                    for fragment in self.fragments:
                        for name, buffer in fragment.outer.momentum_buffer.items():
                            buffer.copy_(torch.as_tensor(momentum[name]))
                for r, (average, participants) in request.get("pending", {}).items():
                    tensors = {n: torch.as_tensor(a).float() for n, a in average.items()}
                    self._averages[int(r)] = (tensors, False, int(participants))
            generation = self._generation
            self._inner_loop = threading.Thread(target=self._run_guarded, args=(generation,),
                                                name="inner-loop", daemon=True)
            self._inner_loop.start()

    def _restore_optimizer(self, start_round: int) -> None:
        """AdamW moments saved at `start_round` by this node's worker of the run, if any;
        otherwise the worker keeps the ones it has (fresh ones in a new process)."""
        saved = saved_optimizer(self.cfg, self.partition[0], start_round)
        ranks = range(self.site.ranks if self.sharded else 1)
        if all(saved_optimizer(self.cfg, self.partition[0], start_round, r).is_file() for r in ranks):
            try:
                self.trainer.load_optimizer(saved)
                if self.site is not None:  # ddp: rank 0's moments; fsdp: each rank's own slice
                    self.site.command(LOAD_OPTIMIZER, start_round)
                print(f"restored the AdamW moments of round {start_round} from {saved}", flush=True)
                return
            except Exception as err:  # noqa: BLE001 - a damaged file only costs the moments
                print(f"could not restore {saved} ({err})", flush=True)
        print(f"joining after round {start_round} without saved AdamW moments", flush=True)

    def _save_optimizer(self, server_round: int) -> None:
        cfg = self.cfg
        if not cfg.checkpoint_due(server_round):
            return
        if self.sharded:  # ddp: rank 0's moments are everyone's
            self.site.command(SAVE_OPTIMIZER, server_round)
        save_optimizer(self.trainer, cfg, self.partition[0], server_round)

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """Deliver the average this round's message carries; return Δ(r) once it exists."""
        with self._state:  # a prepare in progress holds it: wait for the state it brings
            if self.trainer is None:
                # A fresh process: the one that trained before it is gone. Ask for the state.
                return {"needs_state": True}
        server_round = int(request["round"])
        delivered = int(request.get("aggregate_round", 0))
        if delivered:
            shapes = self._wire_shapes(round_fragment(delivered, len(self.fragments)))
            average = decode_tensors(request["aggregate"], self.cfg.wire_precision, shapes)
            with self._state:
                self._averages[delivered] = (average, bool(request.get("counted", True)),
                                             int(request.get("participants", 0)))
                self._state.notify_all()
        deadline = time.monotonic() + self.cfg.round_timeout
        with self._state:
            while server_round not in self._replies:
                if server_round <= self.start_round:
                    raise ValueError(f"round {server_round} closed before this worker (re)started "
                                     f"after round {self.start_round}; it has no outer gradient for it")
                if self._failure:
                    raise RuntimeError(f"the inner loop failed:\n{self._failure}")
                if self._stopping:
                    raise WorkerStopped("worker is shutting down")
                if not self._state.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"round {server_round}: no outer gradient after "
                                       f"{self.cfg.round_timeout:.0f}s")
            for old in [r for r in self._replies if r < server_round]:  # kept for one retry only
                del self._replies[old]
            return self._replies[server_round]

    def stop(self) -> None:
        with self._state:
            self._stopping = True
            self._state.notify_all()

    def close_site(self) -> None:
        """End the site's other ranks once the inner loop has stopped using the group."""
        if self.site is None:
            return
        if self._inner_loop is not None:
            self._inner_loop.join(timeout=60)
        self.site.close()
        self.site = None

    # ----- the inner loop (its own thread) -----

    def _run_guarded(self, generation: int) -> None:
        try:
            self._run(generation)
        except WorkerStopped:
            pass
        except Exception:  # noqa: BLE001 - reported to the next request
            with self._state:
                self._failure = traceback.format_exc()
                self._state.notify_all()
            if self.site is not None and self.on_site_failure is not None:
                self.on_site_failure(f"the inner loop failed:\n{self._failure}")

    def _run(self, generation: int) -> None:
        cfg, trainer = self.cfg, self.trainer
        interval, num_fragments = cfg.sync_interval, len(self.fragments)
        last_step = cfg.flower_rounds * interval
        due: dict[int, list[int]] = {}  # inner step → rounds whose average is applied then
        meter = _RoundMeter()
        trainer.model.train()
        for step in range(trainer.step + 1, last_step + 1):
            if self._stopping or self._generation != generation:
                raise WorkerStopped()
            began = time.perf_counter()
            if self.site is not None:
                self.site.command(STEP)
            meter.losses.append(trainer.train_step())
            meter.compute_seconds += time.perf_counter() - began
            self._progress.publish(step)

            if step % interval == 0:
                server_round = step // interval
                fragment = self.fragments[round_fragment(server_round, num_fragments)]
                wire = self._send(server_round, fragment, meter)
                self._save_optimizer(server_round)
                meter = _RoundMeter()
                if step == last_step:
                    self._keep_site_until_stopped(generation)
                    break  # nothing applied after the last sync would ever be used
                if cfg.staleness == 0:
                    due.setdefault(step + cfg.overlap_steps, []).append(server_round)
                else:
                    stale = stale_round(server_round, cfg.staleness, num_fragments)
                    # What the server decodes is what it averaged in, so that is what to subtract later.
                    sent = decode_tensors(wire, cfg.wire_precision, self._wire_shapes(fragment.index))
                    stale_average, counted, participants = self._wait_for_average(stale, fragment, meter,
                                                                                  generation)
                    self._eager_step(fragment, (server_round, stale), sent, stale_average, counted,
                                     participants)

            for server_round in due.pop(step, []):
                fragment = self.fragments[round_fragment(server_round, num_fragments)]
                average, _, _ = self._wait_for_average(server_round, fragment, meter, generation)
                self._outer_step(fragment, average)

    @property
    def sharded(self) -> bool:
        """fsdp: every rank of the site holds its slice of the parameters and the outer state."""
        return self.site is not None and self.site.sharded

    def _wire_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        """Fragment `index`'s full shapes, as its outer gradients and averages travel."""
        if self.sharded:
            return {key: tuple(shape) for key, shape in self.layouts[index].shapes.items()}
        return self.fragments[index].shapes

    def _outer_gradient(self, fragment: Fragment) -> Tensors:
        """Δ of the whole fragment (under fsdp assembled on rank 0 from the ranks' slices)."""
        if not self.sharded:
            return fragment.outer_gradient(self.trainer.model)
        self.site.command(SEND_DELTA, fragment.index)
        return sharded_outer_gradient(self.site, fragment, self.layouts[fragment.index], self.trainer.model)

    def _outer_step(self, fragment: Fragment, average: Tensors) -> None:
        """The outer step on `fragment` with round r's average, on every rank of the site."""
        if self.sharded:
            self.site.command(OUTER_STEP, fragment.index)
            sharded_outer_step(self.site, fragment, self.layouts[fragment.index], self.trainer.model,
                               self.cfg.mixing, average)
            return
        fragment.apply(average, self.trainer.model, self.cfg.mixing)
        self._broadcast(fragment)

    def _eager_step(self, fragment: Fragment, rounds: tuple[int, int], sent: Tensors, stale_average: Tensors,
                    counted: bool, participants: int) -> None:
        """The delayed/eager step (Fragment.eager_step) at round r = rounds[0], on every rank."""
        weight = eager_weight(self.cfg, participants, self.partition[1])
        if self.sharded:
            self.site.command(EAGER_STEP, fragment.index, *rounds, counted, participants)
            sharded_eager_step(self.site, fragment, self.layouts[fragment.index], self.trainer.model, rounds,
                               counted, weight, sent, stale_average)
            return
        fragment.eager_step(*rounds, sent, stale_average, counted, weight, self.trainer.model)
        self._broadcast(fragment)

    def _broadcast(self, fragment: Fragment) -> None:
        """ddp: every rank takes rank 0's result of an outer step on `fragment`."""
        if self.site is not None:
            self.site.command(SET_FRAGMENT, fragment.index)
            self.site.broadcast_parameters(self.trainer.model, parameter_names(fragment.keys))

    def _keep_site_until_stopped(self, generation: int) -> None:
        """The other ranks wait in a collective for rank 0's next command: keep it alive
        (with a heartbeat a second) until the run shuts the worker down or restarts it."""
        if self.site is None:
            return
        with self._state:
            while not (self._stopping or self._generation != generation):
                if not self._state.wait(timeout=1.0):
                    self.site.command(NOOP)

    def _finish_queued_steps(self, meter: _RoundMeter) -> None:
        """Wait for the steps the device still has queued (CUDA runs them asynchronously);
        that wait is compute time."""
        began = time.perf_counter()
        self.trainer.synchronize()
        meter.compute_seconds += time.perf_counter() - began

    def _send(self, server_round: int, fragment: Fragment, meter: _RoundMeter) -> dict[str, np.ndarray]:
        """Post round r's reply; returns the encoded outer gradient it carries."""
        cfg, trainer = self.cfg, self.trainer
        self._finish_queued_steps(meter)
        wire = encode_tensors(self._outer_gradient(fragment), cfg.wire_precision)
        ranks = cfg.ranks_per_worker
        tokens = len(meter.losses) * trainer.stream.batch_size * ranks * cfg.seq_len
        tokens_per_second = tokens / meter.compute_seconds
        metrics = {
            "train_loss": mean_loss(torch.stack(meter.losses)),
            "tokens": tokens,
            "compute_seconds": meter.compute_seconds,
            "idle_seconds": meter.idle_seconds,
            "inner_step": trainer.step,
            "partition_id": self.partition[0],
            "tokens_per_second": tokens_per_second,
        }
        if trainer.peak_flops.flops:  # Flower's metrics carry numbers only, never None
            metrics["mfu"] = mfu(tokens_per_second, trainer.flops_per_token, trainer.peak_flops.flops * ranks)
        reply = {"outer_gradient": wire, "metrics": metrics}
        round_events.record("delta_ready", server_round, partition=self.partition[0],
                            compute_seconds=meter.compute_seconds)
        with self._state:
            self._replies[server_round] = reply
            self._state.notify_all()
        return wire

    def _wait_for_average(self, server_round: int, fragment: Fragment,
                          meter: _RoundMeter, generation: int) -> tuple[Tensors, bool, int]:
        """Round r's average (zero for r ≤ 0: Δ(0) = 0), whether we were counted in it
        and its participant count; the wait counts as idle."""
        if server_round <= 0:
            zero = {key: torch.zeros(shape) for key, shape in self._wire_shapes(fragment.index).items()}
            return zero, False, 0
        with self._state:
            arrived = server_round in self._averages
        if not arrived:
            self._finish_queued_steps(meter)  # or the device's backlog would count as idle
        began = time.perf_counter()
        with self._state:
            while server_round not in self._averages:
                if self._stopping or self._generation != generation:
                    raise WorkerStopped()
                if not self._state.wait(timeout=1.0) and self.site is not None:
                    self.site.command(NOOP)  # the other ranks wait in a collective: keep it alive
            average = self._averages.pop(server_round)
        meter.idle_seconds += time.perf_counter() - began
        round_events.record("average_taken", server_round, partition=self.partition[0])
        return average
