"""The server side of every DiLoCo variant as a Flower Strategy (docs/algorithms.md).

Each Flower round r synchronises one fragment p(r) (the whole model unless streaming):

  1. `configure_train(r)` sends every worker the average of round r − D, the oldest one it
     has not had yet (D = `rounds_in_flight`: 1 for `diloco`, d·P for `delayed`/`eager`), and
     asks for the worker's outer gradient of round r. Workers never wait for the message to
     start computing: they are already running (see clients/worker.py).
  2. `aggregate_train(r, replies)` validates and averages the outer gradients, Δ(r) = Σ w_m Δ_m(r),
     quantizes the average once for the way down, and updates the global parameters θ.

θ is what the server evaluates and checkpoints. Every variant keeps it equal to a well-defined
model, using the same quantized averages the workers receive:

  diloco    θ_p ← Outer_p(θ_p, Δ(r))              every worker holds this θ
  delayed   θ_p ← Outer_p(θ_p, Δ(k))              k = r − d·P; every worker holds this θ
  eager     θ_p ← Outer_p(θ_p, Δ(k) + (Δ(r) − Δ(k))/M)
            the mean of the workers' own outer parameters θ_m: the outer step is linear, so
            the mean follows the mean of the workers' eager updates exactly
            (docs/algorithms.md#what-the-server-evaluates).
            M is round r's participant count; the tracking is exact while every worker
            takes part, and stays the natural estimate when some drop out.

Replies that fail validation (hostile or broken input) are logged with their node id, left
out of the round and counted as `rejected`. A node that failed (its reply is an error: its
worker died, or the SuperLink lost the node) or went silent is counted apart, in
`unavailable_nodes` (`node_failed`): it is a site in trouble, not a hostile one. Such a node,
and one whose worker restarted, gets the server's state (`worker_state`) and contributes again
from its next request.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fl_diloco.config import RunConfig, staleness
from strategies.codecs import CodecError, encode_tensors, encoded_nbytes
from strategies.fragments import fragment_names, round_fragment, rounds_in_flight, select, stale_round
from strategies.protocol import (AGGREGATE_KEY, CONFIG_KEY, METRICS_KEY, MOMENTUM_KEY, NEEDS_STATE_METRIC,
                                 OUTER_GRADIENT_KEY, PARAMS_KEY, REQUIRED_METRICS)
from strategies.outer_optimizer import (OuterOptimizer, Tensors, WeightedAverage, eager_outer_gradient,
                                        zeros_like)
from strategies.validation import decode_outer_gradient
from strategies.wire import from_array_record, serialized_bytes, to_array_record



@dataclass
class RoundStats:
    """What one round's replies added up to (summed over the clients that counted)."""

    round: int
    fragment: int = 0
    participants: int = 0
    rejected: int = 0  # replies that failed validation
    unavailable_nodes: list[int] = field(default_factory=list)  # asked, but failed or went silent
    train_loss: float = float("nan")
    tokens: int = 0
    compute_seconds: float = 0.0
    idle_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    per_client: list[dict] = field(default_factory=list)


@dataclass
class RoundAverage:
    """Round r's average as computed (fp32) and as every worker receives it (wire precision)."""

    exact: Tensors
    received: Tensors
    wire: dict  # the encoded arrays, sent as they are to every node
    contributors: set[int]

    @property
    def participants(self) -> int:
        return len(self.contributors)


def tensors_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a set of tensors taken as one vector."""
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors.values()))


def default_reply_limit(shapes: Mapping[str, tuple[int, ...]], precision: str) -> int:
    """Twice what an outer gradient of `shapes` takes on the wire, plus room for metrics."""
    zeros = {n: torch.zeros(shape) for n, shape in shapes.items()}
    return 2 * encoded_nbytes(encode_tensors(zeros, precision)) + 64 * 1024


class DiLoCo(Strategy):
    """Outer Nesterov SGD over the clients' outer gradients, for diloco, delayed and eager."""

    def __init__(self, initial_params: Mapping[str, torch.Tensor], node_ids: list[int], *,
                 algorithm: str = "diloco", delay: int = 1, num_fragments: int = 1,
                 fragment_pattern: str = "strided", outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, weighting: str = "uniform",
                 wire_precision: str = "fp32", outlier_norm_ratio: float = 0.0,
                 max_reply_bytes: int = 0) -> None:
        if algorithm not in ("diloco", "delayed", "eager"):
            raise ValueError(f"the DiLoCo strategy runs diloco, delayed or eager, not '{algorithm}'")
        self.params = {n: t.detach().float().cpu().clone() for n, t in initial_params.items()}
        self.node_ids = list(node_ids)
        self.algorithm = algorithm
        self.staleness = staleness(algorithm, delay)
        self.fragments = fragment_names({n: t.shape for n, t in self.params.items()}, num_fragments,
                                        fragment_pattern)
        # One optimizer per fragment, over views of the one global parameter dict.
        self.optimizers = [OuterOptimizer(select(self.params, keys), outer_lr, outer_momentum)
                           for keys in self.fragments]
        self.in_flight = rounds_in_flight(self.staleness, self.num_fragments)
        self.weighting = weighting
        self.wire_precision = wire_precision
        self.outlier_norm_ratio = outlier_norm_ratio
        self.max_reply_bytes = max_reply_bytes
        # Nodes whose worker lost its state, and the round in which they said so.
        self.needs_state: dict[int, int] = {}
        self._reply_limits: dict[int, int] = {}
        self.averages: dict[int, RoundAverage] = {}
        self.history: list[RoundStats] = []
        self._pending: dict[int, RoundStats] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig, initial_params: Mapping[str, torch.Tensor],
                    node_ids: list[int]) -> DiLoCo:
        return cls(initial_params, node_ids, algorithm=cfg.algorithm, delay=cfg.delay,
                   num_fragments=cfg.num_fragments, fragment_pattern=cfg.fragment_pattern,
                   outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum,
                   weighting=cfg.weighting, wire_precision=cfg.wire_precision,
                   outlier_norm_ratio=cfg.outlier_norm_ratio, max_reply_bytes=cfg.max_reply_bytes)

    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    @property
    def momentum_buffer(self) -> Tensors:
        return {n: b for opt in self.optimizers for n, b in opt.momentum_buffer.items()}

    def summary(self) -> None:
        opt = self.optimizers[0]
        log(INFO, "\t├──> %s, outer Nesterov SGD lr=%s momentum=%s", self.algorithm, opt.lr, opt.momentum)
        if self.staleness:
            log(INFO, "\t├──> averages applied %d outer step(s) late, %d round(s) in flight",
                self.staleness, self.in_flight)
        log(INFO, "\t├──> %d fragment(s), outer gradients on the wire as %s", self.num_fragments,
            self.wire_precision)
        log(INFO, "\t└──> %d clients, %s weighting", len(self.node_ids), self.weighting)

    def worker_state(self, after_round: int = 0) -> RecordDict:
        """What a worker needs to start training right after round `after_round` closed.

        θ(0) before round 1. Later (a worker that restarted, or every worker of a resumed
        run): θ and the outer momentum, both of which a `diloco`/`delayed` worker keeps as a
        replica and an eager joiner takes as its own start, plus the averages it will still
        apply that were sent before it (re)joined: rounds after_round − d·P + 1 … after_round.
        A joiner has sent nothing, so it has no stale outer gradient to subtract.
        """
        content = RecordDict({PARAMS_KEY: to_array_record({n: t.numpy() for n, t in self.params.items()})})
        if after_round == 0:
            return content
        content[MOMENTUM_KEY] = to_array_record({n: b.numpy() for n, b in self.momentum_buffer.items()})
        pending = [r for r in sorted(self.averages)
                   if after_round - self.staleness * self.num_fragments < r <= after_round]
        for r in pending:
            content[f"{AGGREGATE_KEY}.{r}"] = to_array_record(
                {n: t.numpy() for n, t in self.averages[r].received.items()})
        content[CONFIG_KEY] = ConfigRecord({
            "start_round": after_round, "pending_rounds": pending,
            "pending_participants": [self.averages[r].participants for r in pending]})
        return content

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything the outer loop needs to continue: tensors, and JSON-able metadata."""
        tensors = {f"params.{n}": t for n, t in self.params.items()}
        tensors.update({f"momentum.{n}": b for n, b in self.momentum_buffer.items()})
        for r, average in self.averages.items():
            tensors.update({f"average.{r}.{n}": t for n, t in average.exact.items()})
        meta = {"averages": {str(r): sorted(a.contributors) for r, a in self.averages.items()},
                "history": [dataclasses.asdict(stats) for stats in self.history]}
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Restore what `state_dict` returned (the model and variant must be the same)."""
        buffers = self.momentum_buffer
        expected = {f"params.{n}" for n in self.params} | {f"momentum.{n}" for n in buffers}
        missing = expected - set(tensors)
        if missing:
            raise ValueError(f"the saved outer state lacks {sorted(missing)[:3]}: it belongs to a "
                             f"different model or configuration")
        with torch.no_grad():  # in place: the fragment optimizers hold views of these
            for n in self.params:
                self.params[n].copy_(tensors[f"params.{n}"])
            for n, buffer in buffers.items():
                buffer.copy_(tensors[f"momentum.{n}"])
        self.averages = {}
        for r, contributors in meta["averages"].items():
            fragment = round_fragment(int(r), self.num_fragments)
            exact = {n: tensors[f"average.{r}.{n}"].float() for n in self.fragments[fragment]}
            self.averages[int(r)] = self._round_average(exact, set(contributors), self._shapes(fragment))
        self.history = [RoundStats(**stats) for stats in meta["history"]]

    def configure_train(self, server_round: int, arrays: ArrayRecord | None = None,
                        config: ConfigRecord | None = None, grid: Grid | None = None) -> Iterable[Message]:
        """Round r's messages: the average of round r − D (if any), and the request for Δ_m(r)."""
        delivered = server_round - self.in_flight
        average = self.averages.get(delivered)
        if delivered >= 1 and average is None:
            raise RuntimeError(f"round {server_round} must carry round {delivered}'s average, "
                               f"which has not been aggregated yet")
        wire = to_array_record(average.wire) if average else None
        messages, bytes_down = [], 0
        for node_id in self.node_ids:
            content = RecordDict({CONFIG_KEY: ConfigRecord({
                "round": server_round,
                "aggregate_round": delivered if average else 0,
                # A worker whose outer gradient was left out of that average must not
                # subtract it again (eager) — it was never added.
                "counted": bool(average and node_id in average.contributors),
                # Eager workers weigh their own outer gradient by 1/M, M as last seen.
                "participants": average.participants if average else 0,
                **(dict(config) if config else {}),
            })})
            if wire is not None:
                content[AGGREGATE_KEY] = wire
            if not messages:  # every message has the same size; serialising once is enough
                bytes_down = serialized_bytes(content)
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id, group_id=str(server_round)))
        self._round_stats(server_round).bytes_down = bytes_down * len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and average round r's replies, then take θ's outer step.

        `replies` is consumed lazily and each accepted outer gradient is folded into a running
        sum at once, so memory stays O(model size) however many clients reply. The norm check
        needs the round's median, which is only known at the end: a reply far above the
        median of the norms seen so far (and the first two, before a median means anything)
        is held back and judged when the round closes. Only outliers are held that long.
        """
        stats = self._round_stats(server_round)
        fragment = stats.fragment
        shapes = self._shapes(fragment)
        size_limit = self.max_reply_bytes or self._reply_limits.setdefault(
            fragment, default_reply_limit(shapes, self.wire_precision))
        average = WeightedAverage()
        losses: list[tuple[float, int]] = []
        norms: list[float] = []
        held: list[tuple[int, float, dict, Tensors]] = []
        contributors: set[int] = set()
        seen: set[int] = set()

        def reject(node: int, problem: object) -> None:
            log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node, problem)
            stats.rejected += 1

        def accept(node: int, metrics: dict, outer_grad: Tensors) -> None:
            tokens = int(metrics["tokens"])
            average.add(outer_grad, 1.0 if self.weighting == "uniform" else float(tokens))
            contributors.add(node)
            losses.append((float(metrics["train_loss"]), tokens))
            stats.participants += 1
            stats.tokens += tokens
            stats.compute_seconds += float(metrics["compute_seconds"])
            stats.idle_seconds += float(metrics["idle_seconds"])
            stats.per_client.append({"node_id": node, **metrics})

        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                # An error the node itself sent. (One the SuperLink writes for a node it lost
                # carries the SuperLink's id: the ServerApp's RoundPipeline names the node asked.)
                self.node_failed(server_round, node, reply.error.reason)
                continue
            size = serialized_bytes(reply.content)
            stats.bytes_up += size
            try:
                self._check_sender(reply, server_round, seen)
                seen.add(node)
                if size > size_limit:
                    raise CodecError(f"message of {size} bytes exceeds the limit of {size_limit} "
                                     f"(max_reply_bytes)")
                if self._asks_for_state(reply):
                    self.needs_state.setdefault(node, server_round)
                    log(INFO, "round %d: node %d has a fresh worker; it gets the server's state",
                        server_round, node)
                    continue
                metrics, outer_grad = self._read_reply(reply, shapes)
            except CodecError as problem:
                reject(node, problem)
                continue
            norm = tensors_norm(outer_grad)
            norms.append(norm)
            if self.outlier_norm_ratio and (len(norms) < 3
                                            or norm > self.outlier_norm_ratio * statistics.median_low(norms)):
                held.append((node, norm, metrics, outer_grad))
            else:
                accept(node, metrics, outer_grad)
        for node, norm, metrics, outer_grad in held:
            limit = self.outlier_norm_ratio * statistics.median_low(norms)
            if norm > limit:
                reject(node, f"outer-gradient norm {norm:.4g} is above {self.outlier_norm_ratio:g} x "
                             f"the round's median ({limit:.4g}; outlier_norm_ratio)")
            else:
                accept(node, metrics, outer_grad)

        if average.count:
            exact = average.result()
            stats.train_loss = sum(l * t for l, t in losses) / sum(t for _, t in losses)
        else:
            # Nobody contributed: the round's average is zero, on the server and on every
            # worker alike, so their outer states stay in step.
            log(WARNING, "round %d: no usable reply; the round's average is zero", server_round)
            exact = zeros_like(self.optimizers[fragment].params)
        self.averages[server_round] = self._round_average(exact, contributors, shapes)
        self.optimizers[fragment].step(self._global_update(server_round))
        self._forget_old_averages(server_round)
        self.history.append(self._pending.pop(server_round))
        return None, MetricRecord({"train_loss": stats.train_loss, "tokens": stats.tokens,
                                   "participants": stats.participants})

    def node_failed(self, server_round: int, node: int, reason: str) -> None:
        """Node `node` was asked for round r's outer gradient and failed: it answered with an
        error, or not at all. Counted apart from rejected replies, and sent the server's state
        (its worker may have died; a worker that did not just takes the state again)."""
        log(WARNING, "round %d: node %d failed: %s", server_round, node, reason)
        self._round_stats(server_round).unavailable_nodes.append(node)
        if node in self.node_ids:
            self.needs_state.setdefault(node, server_round)

    def _round_stats(self, server_round: int) -> RoundStats:
        """Round r's stats while it is open (configure_train starts them, aggregate_train closes them)."""
        return self._pending.setdefault(server_round, RoundStats(
            round=server_round, fragment=round_fragment(server_round, self.num_fragments)))

    def _shapes(self, fragment: int) -> dict[str, tuple[int, ...]]:
        """Fragment p's keys and shapes, read off the views its optimizer already holds."""
        return {key: tuple(t.shape) for key, t in self.optimizers[fragment].params.items()}

    def _round_average(self, exact: Tensors, contributors: set[int],
                       shapes: Mapping[str, tuple[int, ...]]) -> RoundAverage:
        """Quantize the average once, exactly as every worker will decode it."""
        wire = encode_tensors(exact, self.wire_precision)
        received = decode_outer_gradient(wire, self.wire_precision, shapes)
        return RoundAverage(exact, received, wire, contributors)

    def _check_sender(self, reply: Message, server_round: int, seen: set[int]) -> None:
        """A reply must answer this round's request, from a node of the run, once."""
        node = reply.metadata.src_node_id
        if node not in self.node_ids:
            raise CodecError(f"node {node} is not one of this run's nodes")
        if reply.metadata.group_id != str(server_round):
            raise CodecError(f"it answers round '{reply.metadata.group_id}', not round {server_round} "
                             f"(a late reply for a closed round, or a forged one)")
        if node in seen:
            raise CodecError("a second reply from the same node in one round")

    def _global_update(self, server_round: int) -> Tensors:
        """The outer gradient θ's fragment takes this round (module docstring)."""
        current = self.averages[server_round]
        if self.staleness == 0:
            return current.received
        stale = self.averages.get(stale_round(server_round, self.staleness, self.num_fragments))
        if stale is None:  # before round d·P there is no stale average: Δ(k ≤ 0) = 0
            stale = RoundAverage(zeros_like(current.exact), zeros_like(current.exact), {}, set())
        if self.algorithm == "delayed":
            return stale.received
        # The mean over this round's M participants of their eager updates (module docstring).
        weight = 1.0 / max(1, current.participants)
        return eager_outer_gradient(stale.received, current.exact, stale.exact, weight)

    def _forget_old_averages(self, server_round: int) -> None:
        # Still needed: the stale average of the next rounds, and the ones not yet delivered.
        keep_from = server_round + 1 - max(self.in_flight, self.staleness * self.num_fragments)
        for old in [r for r in self.averages if r < keep_from]:
            del self.averages[old]

    @staticmethod
    def _asks_for_state(reply: Message) -> bool:
        return (METRICS_KEY in reply.content.metric_records
                and bool(reply.content[METRICS_KEY].get(NEEDS_STATE_METRIC, 0))
                and OUTER_GRADIENT_KEY not in reply.content.array_records)

    def _read_reply(self, reply: Message, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, Tensors]:
        """The reply's metrics and decoded outer gradient; CodecError says what is wrong."""
        content = reply.content
        if OUTER_GRADIENT_KEY not in content.array_records:
            raise CodecError(f"no '{OUTER_GRADIENT_KEY}' array record")
        if METRICS_KEY not in content.metric_records:
            raise CodecError(f"no '{METRICS_KEY}' metric record")
        metrics = dict(content[METRICS_KEY])
        missing = [key for key in REQUIRED_METRICS if key not in metrics]
        if missing:
            raise CodecError(f"metrics {missing} missing")
        for key in REQUIRED_METRICS:
            if not isinstance(metrics[key], (int, float)) or not math.isfinite(metrics[key]):
                raise CodecError(f"metric '{key}' is {metrics[key]!r}, not a finite number")
        if int(metrics["tokens"]) <= 0:
            raise CodecError(f"non-positive token count {metrics['tokens']}")
        try:
            arrays = from_array_record(content[OUTER_GRADIENT_KEY])
        except ValueError as err:
            raise CodecError(f"unreadable '{OUTER_GRADIENT_KEY}' record: {err}") from None
        return metrics, decode_outer_gradient(arrays, self.wire_precision, shapes)

    # Evaluation is centralised (the server evaluates θ on held-out text), so there is no
    # client-side evaluation round.
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
