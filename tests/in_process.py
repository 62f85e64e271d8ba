"""Drive the real strategy and workers in one process, without Flower's transport.

It follows the server's protocol exactly (prepare with θ(0), then round by round: the
strategy's message, the worker's reply, aggregation) and builds requests and replies with the
ClientApp adapter's own functions, so tests can check the algorithms through `DiLoCo` and
`Worker` in seconds. tests/test_reference.py also runs real Flower.

A config with ranks_per_worker > 1 needs each worker in a process of its own (rank 0 of its
site's torch.distributed group): those workers are real worker processes, driven through the
private channel exactly as the ClientApp adapter drives them.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from clients.channel import WorkerError, WorkerHandle
from clients.worker import Worker, build_trainer
from fl_diloco.client_app import prepare_request_fields, train_reply_content, train_request_fields
from fl_diloco.config import RunConfig
from strategies.diloco import PARAMS_KEY, DiLoCo
from strategies.wire import from_array_record


_node_ids = itertools.count(os.getpid() * 1000)


class ProcessWorker:
    """A worker process started and called like the adapter does, with `Worker`'s interface."""

    def __init__(self, cfg: RunConfig) -> None:
        self.handle_ = WorkerHandle(run_id=1, node_id=next(_node_ids))
        self.handle_.ensure_running(watch_pid=os.getpid(), idle_timeout=cfg.worker_idle_seconds)
        self.timeout = cfg.round_timeout

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.handle_.call(request, timeout=self.timeout)
        except WorkerError as err:
            return {"error": str(err)}

    def stop(self) -> None:
        self.handle({"kind": "shutdown"})


def run_in_process(cfg: RunConfig, rounds: int | None = None, worker_cfg: RunConfig | None = None,
                   resync_after: int = 0) -> tuple[DiLoCo, list[Worker]]:
    """Run `rounds` Flower rounds (default: the whole run) of `cfg` with M in-process workers.

    `resync_after` r > 0: once round r closed, every worker is prepared again with the server's
    state after it, as a resumed run's workers are.

    `worker_cfg`, when given, is the config the workers receive instead of `cfg`: the planted-bug
    tests use it to give workers a wrong τ or α while the server and the reference keep the right one.
    """
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    initial = build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()
    node_ids = list(range(100, 100 + cfg.num_clients))
    strategy = DiLoCo.from_config(cfg, initial, node_ids)
    workers = [Worker() if cfg.ranks_per_worker == 1 else ProcessWorker(cfg) for _ in node_ids]
    common = {"run_config": (worker_cfg or cfg).to_dict(), "num_partitions": cfg.num_clients, "device": "cpu"}
    theta0 = from_array_record(strategy.worker_state()[PARAMS_KEY])
    for partition, worker in enumerate(workers):
        answer = worker.handle({"kind": "prepare", "partition_id": partition, "params": theta0, **common})
        assert "error" not in answer, answer["error"]
    try:
        for server_round in range(1, (rounds or cfg.flower_rounds) + 1):
            replies = []
            for partition, (message, worker) in enumerate(zip(strategy.configure_train(server_round), workers)):
                answer = worker.handle({"kind": "train", "partition_id": partition, **common,
                                        **train_request_fields(message.content)})
                assert "error" not in answer, answer["error"]
                replies.append(Message(content=train_reply_content(answer), reply_to=message))
            strategy.aggregate_train(server_round, replies)
            if server_round == resync_after:
                state = prepare_request_fields(strategy.worker_state(server_round))
                for partition, worker in enumerate(workers):
                    answer = worker.handle({"kind": "prepare", "partition_id": partition, **common,
                                            **state})
                    assert "error" not in answer, answer["error"]
    finally:
        for worker in workers:  # let each inner loop finish what it was applying, then end
            worker.stop()
            if isinstance(worker, Worker):
                worker._inner_loop.join(timeout=60)
    return strategy, workers
