"""Drive the real strategy and workers in one process, without Flower's transport.

It follows the server's protocol exactly (prepare with θ(0), then round by round: the
strategy's message, the worker's reply, aggregation), so tests can check the algorithms
through `DiLoCo` and `Worker` in seconds. tests/test_reference.py also runs real Flower.
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.worker import Worker, build_trainer
from fl_diloco.config import RunConfig
from strategies.diloco import AGGREGATE_KEY, CONFIG_KEY, METRICS_KEY, OUTER_GRADIENT_KEY, PARAMS_KEY, DiLoCo
from strategies.wire import from_array_record, to_array_record


def request_for(worker_message: Message, cfg: RunConfig, partition: int) -> dict:
    """What the ClientApp adapter forwards to the worker for one train message."""
    content = worker_message.content
    config = content[CONFIG_KEY]
    return {"kind": "train", "round": int(config["round"]),
            "aggregate_round": int(config["aggregate_round"]), "counted": bool(config["counted"]),
            "aggregate": from_array_record(content[AGGREGATE_KEY])
            if AGGREGATE_KEY in content.array_records else None,
            "run_config": cfg.to_dict(), "partition_id": partition, "num_partitions": cfg.num_clients}


def reply_for(worker_message: Message, answer: dict) -> Message:
    assert "error" not in answer, answer.get("error")
    return Message(content=RecordDict({OUTER_GRADIENT_KEY: to_array_record(answer["outer_gradient"]),
                                       METRICS_KEY: MetricRecord(answer["metrics"])}),
                   reply_to=worker_message)


def run_in_process(cfg: RunConfig, rounds: int | None = None) -> tuple[DiLoCo, list[Worker]]:
    """Run `rounds` Flower rounds (default: the whole run) of `cfg` with M in-process workers."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    initial = build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()
    node_ids = list(range(100, 100 + cfg.num_clients))
    strategy = DiLoCo.from_config(cfg, initial, node_ids)
    workers = [Worker() for _ in node_ids]
    theta0 = from_array_record(strategy.initial_state()[PARAMS_KEY])
    for partition, worker in enumerate(workers):
        answer = worker.handle({"kind": "prepare", "run_config": cfg.to_dict(), "partition_id": partition,
                                "num_partitions": cfg.num_clients, "device": "cpu", "params": theta0})
        assert "error" not in answer, answer["error"]
    try:
        for server_round in range(1, (rounds or cfg.flower_rounds) + 1):
            messages = list(strategy.configure_train(server_round))
            replies = [reply_for(m, worker.handle(request_for(m, cfg, p)))
                       for p, (m, worker) in enumerate(zip(messages, workers))]
            strategy.aggregate_train(server_round, replies)
    finally:
        for worker in workers:  # let each inner loop finish what it was applying, then end
            worker.stop()
            worker._inner_loop.join(timeout=60)
    return strategy, workers
