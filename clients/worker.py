"""What a node's persistent worker does with each request from its ClientApp adapter.

The worker is built lazily on the first `train` request, from the run config that request
carries, and then stays resident: the same model, AdamW state and data position serve
every round (SPEC §5). Requests and replies are plain dicts of numpy arrays and numbers,
so this class can be driven directly in tests without any process or socket.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import torch

from clients.inner_loop import InnerTrainer
from fl_diloco.config import RunConfig, resolve_device
from fl_diloco.data import BatchStream, Corpus, load_corpus
from fl_diloco.model import Transformer, model_config


def worker_threads(cfg: RunConfig) -> int:
    """Torch threads per worker: the machine's cores shared among the co-located workers."""
    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    return max(1, (os.cpu_count() or 1) // cfg.num_clients)


def worker_stream(cfg: RunConfig, corpus: Corpus, partition_id: int, num_partitions: int) -> BatchStream:
    """Worker `partition_id`'s batches: its own shard, walked in its own reproducible order."""
    return BatchStream(corpus.train_sequences(partition_id, num_partitions), cfg.batch_size,
                       seed=cfg.seed * 1000 + partition_id)


def build_trainer(cfg: RunConfig, partition_id: int, num_partitions: int, device: str) -> InnerTrainer:
    """The worker's resident state: its shard's stream, the model and the inner optimizer."""
    corpus = load_corpus(cfg.data_config())
    stream = worker_stream(cfg, corpus, partition_id, num_partitions)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(cfg.model_preset, vocab_size=corpus.vocab_size, seq_len=cfg.seq_len))
    return InnerTrainer(model, stream, cfg, device)


class Worker:
    def __init__(self) -> None:
        self.trainer: InnerTrainer | None = None
        self.partition: tuple[int, int] | None = None
        self.last_reply_at: float | None = None
        self.last_round = 0
        self.last_reply: dict[str, Any] | None = None

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve one request; failures come back as {"error": traceback}, never as a crash."""
        try:
            kind = request.get("kind")
            if kind == "ping":
                return {"ok": True, "pid": os.getpid()}
            if kind == "prepare":
                self._ensure_trainer(request)
                self.last_reply_at = time.perf_counter()  # ready: waiting from here on is idle
                return {"ok": True}
            if kind == "train":
                return self.train(request)
            if kind == "shutdown":
                return {"ok": True}
            return {"error": f"unknown request kind {kind!r}"}
        except Exception:  # noqa: BLE001 - the adapter reports it with the node id
            return {"error": traceback.format_exc()}

    def _ensure_trainer(self, request: dict[str, Any]) -> RunConfig:
        """Build the resident trainer on first use; afterwards only check it is the same shard."""
        cfg = RunConfig.from_mapping(request["run_config"])
        partition = (int(request["partition_id"]), int(request["num_partitions"]))
        if self.trainer is None:
            device = resolve_device(request.get("device") or cfg.device)
            if device == "cpu":
                torch.set_num_threads(worker_threads(cfg))
            self.trainer = build_trainer(cfg, *partition, device)
            self.partition = partition
        elif partition != self.partition:
            raise ValueError(f"worker holds partition {self.partition} but was asked for {partition}")
        return cfg

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        received_at = time.perf_counter()
        round_ = int(request["round"])
        if round_ == self.last_round and self.last_reply is not None:
            return self.last_reply  # the adapter retried a round we already trained
        cfg = self._ensure_trainer(request)
        # Time spent waiting for the server since our last reply: what overlap variants hide.
        idle = 0.0 if self.last_reply_at is None else received_at - self.last_reply_at

        self.trainer.load_parameters(request["params"])
        result = self.trainer.run_phase(cfg.inner_steps)
        reply = {
            "outer_gradient": {n: t.numpy() for n, t in result.outer_gradient.items()},
            "metrics": {
                "train_loss": result.train_loss,
                "tokens": result.tokens,
                "compute_seconds": result.compute_seconds,
                "idle_seconds": idle,
                "inner_step": self.trainer.step,
                "partition_id": self.partition[0],
            },
        }
        self.last_round, self.last_reply = round_, reply
        self.last_reply_at = time.perf_counter()
        return reply
