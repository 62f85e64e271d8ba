"""DiLoCo's server side as a Flower Strategy: average outer gradients, take a Nesterov step.

The strategy holds the authoritative global parameters θ and the outer momentum buffer b.
Each round it sends θ(t−1) to the selected nodes, gets back Δ_m(t) = θ(t−1) − θ_m,local(t),
averages them (uniform or token-weighted) and applies `nesterov_outer_step` (SPEC §1).
Replies that fail validation are logged with their node id and left out; if none is left,
θ and b stay exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from strategies.outer_optimizer import Tensors, WeightedAverage, nesterov_outer_step, zeros_like
from strategies.validation import outer_gradient_problem
from strategies.wire import from_array_record, serialized_bytes, to_array_record, to_tensors

# Keys of the records exchanged with the ClientApp.
PARAMS_KEY = "params"
CONFIG_KEY = "config"
OUTER_GRADIENT_KEY = "outer_gradient"
METRICS_KEY = "metrics"


@dataclass
class RoundStats:
    """What one round's replies added up to (summed over the clients that counted)."""

    round: int
    participants: int = 0
    rejected: int = 0
    train_loss: float = float("nan")
    tokens: int = 0
    compute_seconds: float = 0.0
    idle_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    per_client: list[dict] = field(default_factory=list)


class DiLoCo(Strategy):
    """Outer Nesterov SGD over the clients' outer gradients."""

    def __init__(self, initial_params: Tensors, node_ids: list[int], outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, weighting: str = "uniform") -> None:
        self.params = {n: t.detach().float().clone() for n, t in initial_params.items()}
        self.momentum_buffer = zeros_like(self.params)
        self.node_ids = list(node_ids)
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.weighting = weighting
        self.history: list[RoundStats] = []
        self._pending: RoundStats | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> DiLoCo outer optimizer: Nesterov SGD, lr=%s, momentum=%s",
            self.outer_lr, self.outer_momentum)
        log(INFO, "\t└──> %d clients, %s weighting", len(self.node_ids), self.weighting)

    def configure_train(self, server_round: int, arrays: ArrayRecord | None = None,
                        config: ConfigRecord | None = None, grid: Grid | None = None) -> Iterable[Message]:
        # θ is always the strategy's own copy: `arrays` exists for Strategy.start's signature.
        content = RecordDict({
            PARAMS_KEY: to_array_record({n: t.numpy() for n, t in self.params.items()}),
            CONFIG_KEY: ConfigRecord({"round": server_round, **(dict(config) if config else {})}),
        })
        size = serialized_bytes(content)
        self._pending = RoundStats(round=server_round, bytes_down=size * len(self.node_ids))
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id,
                        group_id=str(server_round)) for node_id in self.node_ids]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self._pending if self._pending and self._pending.round == server_round \
            else RoundStats(round=server_round)
        self._pending = None
        average = WeightedAverage()
        losses: list[tuple[float, int]] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, node, reply.error.reason)
                stats.rejected += 1
                continue
            stats.bytes_up += serialized_bytes(reply.content)
            problem = self._reply_problem(reply)
            if problem is not None:
                log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node, problem)
                stats.rejected += 1
                continue
            metrics = dict(reply.content[METRICS_KEY])
            tokens = int(metrics["tokens"])
            weight = 1.0 if self.weighting == "uniform" else float(tokens)
            average.add(to_tensors(from_array_record(reply.content[OUTER_GRADIENT_KEY])), weight)
            losses.append((float(metrics["train_loss"]), tokens))
            stats.participants += 1
            stats.tokens += tokens
            stats.compute_seconds += float(metrics["compute_seconds"])
            stats.idle_seconds += float(metrics["idle_seconds"])
            stats.per_client.append({"node_id": node, **metrics})

        if average.count == 0:
            log(WARNING, "round %d: no usable reply; global parameters left unchanged", server_round)
            self.history.append(stats)
            return None, None

        nesterov_outer_step(self.params, average.result(), self.momentum_buffer,
                            self.outer_lr, self.outer_momentum)
        stats.train_loss = sum(l * t for l, t in losses) / max(1, sum(t for _, t in losses))
        self.history.append(stats)
        return (to_array_record({n: t.numpy() for n, t in self.params.items()}),
                MetricRecord({"train_loss": stats.train_loss, "tokens": stats.tokens,
                              "participants": stats.participants}))

    def _reply_problem(self, reply: Message) -> str | None:
        content = reply.content
        if OUTER_GRADIENT_KEY not in content.array_records:
            return f"no '{OUTER_GRADIENT_KEY}' array record"
        if METRICS_KEY not in content.metric_records:
            return f"no '{METRICS_KEY}' metric record"
        metrics = content[METRICS_KEY]
        for key in ("tokens", "train_loss", "compute_seconds", "idle_seconds"):
            if key not in metrics:
                return f"metric '{key}' missing"
        if int(metrics["tokens"]) <= 0:
            return f"non-positive token count {metrics['tokens']}"
        return outer_gradient_problem(from_array_record(content[OUTER_GRADIENT_KEY]), self.params)

    # Evaluation is centralised (the server evaluates θ on held-out text), so there is no
    # client-side evaluation round.
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
