"""The ClientApp: a thin adapter between Flower messages and the node's persistent worker.

In deployment Flower starts a fresh ClientApp process for every message and ends it after
the reply (docs/algorithms.md#flower-constraints), so nothing that must survive a round can
live here. This adapter finds (or starts) the node's worker process, hands it the round's
message, and turns its answer into the reply. Simulation and deployment take exactly this path.
It passes the message's arrays on as views of the bytes Flower received (strategies.wire), and
the channel sends them to the worker out of band, so the payload is not copied here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.channel import WorkerHandle
from fl_diloco import round_events
from fl_diloco.config import RunConfig
from fl_diloco.console import quiet_actor_shutdown
from strategies.protocol import (AGGREGATE_KEY, CONFIG_KEY, METRICS_KEY, MOMENTUM_KEY, NEEDS_STATE_METRIC,
                                OUTER_GRADIENT_KEY, PARAMS_KEY)
from strategies.wire import array_views, to_array_record

PREPARE_ACTION = "prepare"
# The run config the server resolved, sent with every prepare (see server_app.prepare_content).
RUN_CONFIG_KEY = "run_config"
SHUTDOWN_ACTION = "shutdown"

# In simulation each Ray actor imports this module to run the ClientApp; Flower's actors log
# a warning when the simulation ends them, as it always does.
quiet_actor_shutdown()


def train_request_fields(content: RecordDict) -> dict[str, Any]:
    """What a train message asks of the worker: the round, and the average it delivers."""
    config = content[CONFIG_KEY]
    return {"round": int(config["round"]), "aggregate_round": int(config["aggregate_round"]),
            "counted": bool(config["counted"]), "participants": int(config.get("participants", 0)),
            "aggregate": array_views(content[AGGREGATE_KEY])
            if AGGREGATE_KEY in content.array_records else None}


def prepare_request_fields(content: RecordDict) -> dict[str, Any]:
    """The state a prepare message gives the worker (strategies.diloco.DiLoCo.worker_state)."""
    fields: dict[str, Any] = {"params": array_views(content[PARAMS_KEY])}
    if CONFIG_KEY in content.config_records:
        config = content[CONFIG_KEY]
        rounds = [int(r) for r in config["pending_rounds"]]
        fields["start_round"] = int(config["start_round"])
        fields["momentum"] = array_views(content[MOMENTUM_KEY])
        fields["pending"] = {r: (array_views(content[f"{AGGREGATE_KEY}.{r}"]), int(m))
                             for r, m in zip(rounds, config["pending_participants"], strict=True)}
    return fields


def train_reply_content(answer: dict[str, Any]) -> RecordDict:
    """The worker's answer to a train request, as the reply's records."""
    if answer.get("needs_state"):
        return RecordDict({METRICS_KEY: MetricRecord({NEEDS_STATE_METRIC: 1})})
    # Replies stay in Flower's one-Array-per-tensor layout: packed replies made the strategy's
    # peak memory grow with the number of replies (tests/test_load.py), a cause not yet found.
    return RecordDict({OUTER_GRADIENT_KEY: to_array_record(answer["outer_gradient"], packed=False),
                       METRICS_KEY: MetricRecord(answer["metrics"])})


def _node_partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<M>\""
        ) from None


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's run config with `overrides` on top.

    `flwr run` passes the config through `context.run_config`; the in-process launcher
    (`fl-diloco train`) passes it as `overrides`, because Flower's Python simulation API
    has no run-config argument.
    """
    app = ClientApp()

    def run_config(context: Context) -> RunConfig:
        return RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})}, validate=False)

    def call_worker(context: Context, kind: str, cfg: RunConfig | None = None, **fields: Any) -> dict[str, Any]:
        cfg = cfg or run_config(context)
        partition_id, num_partitions = _node_partition(context)
        worker = WorkerHandle(context.run_id, context.node_id)
        # The parent of this process stands for the node: the SuperNode in deployment, the
        # Ray raylet in simulation. The worker exits when it goes away. A live server sends
        # every node a request at least once a round_timeout: a worker that waits longer has no
        # server, and yields to a newer run.
        worker.ensure_running(watch_pid=os.getppid(), idle_timeout=cfg.worker_idle_seconds,
                              yield_after=cfg.round_timeout, start_timeout=cfg.startup_timeout)
        request = {"kind": kind, "run_config": cfg.to_dict(), "partition_id": partition_id,
                   "num_partitions": num_partitions, "device": context.node_config.get("device"),
                   **fields}
        # A prepare builds the worker's corpus and model: start-up, not a round.
        timeout = cfg.startup_timeout if kind == PREPARE_ACTION else cfg.round_timeout
        return worker.call(request, timeout=timeout)

    @app.query(PREPARE_ACTION)
    def prepare(msg: Message, context: Context) -> Message:
        """Start the worker with θ(0), or with the server's state when it (re)joins late; it
        begins training at once, so round timings measure training, not start-up."""
        cfg = (RunConfig.from_mapping(dict(msg.content[RUN_CONFIG_KEY]), validate=False)
               if RUN_CONFIG_KEY in msg.content.config_records else None)
        call_worker(context, "prepare", cfg, **prepare_request_fields(msg.content))
        return Message(content=RecordDict({METRICS_KEY: MetricRecord({"ready": 1})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        server_round = int(msg.content[CONFIG_KEY]["round"])
        if round_events.enabled():  # this process's start, and when Flower handed it the message
            if (started := round_events.process_start_time()) is not None:
                round_events.record("clientapp_started", server_round, context.node_id, t=started)
            round_events.record("adapter_called", server_round, context.node_id,
                                partition=_node_partition(context)[0])
        answer = call_worker(context, "train", **train_request_fields(msg.content))
        reply = Message(content=train_reply_content(answer), reply_to=msg)
        round_events.record("adapter_replied", server_round, context.node_id)
        return reply

    @app.query(SHUTDOWN_ACTION)
    def shutdown(msg: Message, context: Context) -> Message:
        worker = WorkerHandle(context.run_id, context.node_id)
        stopped = worker.is_running()
        if stopped:
            worker.call({"kind": "shutdown"}, timeout=30)
        return Message(content=RecordDict({METRICS_KEY: MetricRecord({"stopped": int(stopped)})}),
                       reply_to=msg)

    return app


app = make_client_app()
