"""A Flower Grid held in memory, with the real workers behind it and faults on demand.

`run_server(FakeGrid(...), cfg)` runs the real ServerApp loop (pipeline, strategy,
checkpoints, resync) against real `Worker` objects in this process, in seconds. Each pushed
message is served in a thread of its own, as Flower serves concurrent messages, through the
ClientApp adapter's own request and reply builders. Tests can make a worker die in the
middle of a round (the node then starts a fresh worker, as `WorkerHandle.ensure_running`
does), make a node go silent, make the SuperLink answer for a node it lost (with the error
Flower's SuperLink writes, which carries the SuperLink's own id), or make the server process
"die" at a round.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from types import SimpleNamespace

from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from clients.worker import Worker
from fl_diloco.client_app import (PREPARE_ACTION, RUN_CONFIG_KEY, SHUTDOWN_ACTION, prepare_request_fields,
                                  train_reply_content, train_request_fields)
from strategies.diloco import CONFIG_KEY, METRICS_KEY


class ServerKilled(RuntimeError):
    """Stands for the ServerApp process being killed."""


class FakeGrid:
    def __init__(self, num_nodes: int, first_node_id: int = 100) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.run = SimpleNamespace(run_id=TaskIdentity.run_id)  # what the ServerApp reads of Grid.run
        self.partitions = {first_node_id + i: i for i in range(num_nodes)}
        self.workers = {node: Worker() for node in self.partitions}
        self.replies: dict[str, Message] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        # Faults: (node, round) → what happens to that node's train request of that round.
        self.crash_at: set[tuple[int, int]] = set()
        self.silent_at: set[tuple[int, int]] = set()
        # The SuperLink lost the node: it answers a train request of that round, or with
        # round 0 every other request, with its own error.
        self.unavailable_at: set[tuple[int, int]] = set()
        self.kill_server_at: int | None = None  # the server "dies" as it opens this round
        self.log: list[str] = []

    # ----- the Grid interface the ServerApp uses -----

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partitions)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if (message.metadata.message_type == MessageType.TRAIN and self.kill_server_at is not None
                    and int(message.content[CONFIG_KEY]["round"]) >= self.kill_server_at):
                raise ServerKilled(f"the server was killed as it opened round {self.kill_server_at}")
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            thread = threading.Thread(target=self._serve, args=(message,), daemon=True)
            self.threads.append(thread)
            thread.start()
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self.lock:
            return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    # ----- the nodes -----

    def _serve(self, message: Message) -> None:
        node = message.metadata.dst_node_id
        kind = message.metadata.message_type
        request = {"partition_id": self.partitions[node], "num_partitions": len(self.partitions),
                   "device": "cpu"}
        server_round = int(message.content[CONFIG_KEY]["round"]) if kind == MessageType.TRAIN else 0
        if (node, server_round) in self.unavailable_at:
            self.log.append(f"node {node} unavailable in round {server_round}")
            with self.lock:
                self.replies[message.metadata.message_id] = create_message_error_unavailable_res_message(
                    message.metadata, "node_unavail")
            return
        if kind == MessageType.TRAIN:
            if (node, server_round) in self.silent_at:
                self.log.append(f"node {node} silent in round {server_round}")
                return
            if (node, server_round) in self.crash_at:
                self.crash(node)
                self._reply(message, error="lost the worker: it died during the round")
                return
            answer = self.workers[node].handle({**request, "kind": "train",
                                                **train_request_fields(message.content)})
        elif kind.endswith(PREPARE_ACTION):
            request.update(kind="prepare", run_config=dict(message.content[RUN_CONFIG_KEY]),
                           **prepare_request_fields(message.content))
            answer = self.workers[node].handle(request)
        elif kind.endswith(SHUTDOWN_ACTION):
            answer = self.workers[node].handle({"kind": "shutdown"})
        else:
            answer = {"error": f"unexpected message type {kind}"}
        if "error" in answer:
            self._reply(message, error=answer["error"])
        elif kind == MessageType.TRAIN:
            self._reply(message, train_reply_content(answer))
        else:
            self._reply(message, RecordDict({METRICS_KEY: MetricRecord({"ok": 1})}))

    def _reply(self, message: Message, content: RecordDict | None = None, error: str | None = None) -> None:
        reply = (Message(Error(code=0, reason=error), reply_to=message) if error
                 else Message(content=content, reply_to=message))
        with self.lock:
            self.replies[message.metadata.message_id] = reply

    def crash(self, node: int) -> None:
        """The node's worker process dies; the next request finds a fresh one."""
        self.log.append(f"node {node} worker crashed")
        self.workers[node].stop()
        self.workers[node] = Worker()

    def stop_all(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for thread in self.threads:
            thread.join(timeout=30)

