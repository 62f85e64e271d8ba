"""Hostile input (issue 5): whatever a node sends, a rejected reply never moves the global
state, and training goes on with the good replies.

The property every test checks: aggregating the good replies together with any number of bad
ones leaves θ and the outer momentum exactly where the good replies alone put them."""

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies.codecs import encode_tensors
from strategies.diloco import METRICS_KEY, OUTER_GRADIENT_KEY, DiLoCo
from strategies.wire import INDEX_KEY, to_array_record

NODES = [10, 11, 12, 13, 14]


pytestmark = pytest.mark.usefixtures("task_identity")


def _params():
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(8, 5, generator=gen), "b": torch.randn(5, generator=gen)}


def _strategy(**kwargs) -> DiLoCo:
    return DiLoCo(_params(), node_ids=NODES, outer_lr=0.7, outer_momentum=0.9, **kwargs)


def _reply(request: Message, grads: dict, metrics: dict | None = None, **extra_records) -> Message:
    metrics = {"train_loss": 2.0, "tokens": 100, "compute_seconds": 1.0, "idle_seconds": 0.1,
               **(metrics or {})}
    content = RecordDict({OUTER_GRADIENT_KEY: to_array_record(grads), METRICS_KEY: MetricRecord(metrics),
                          **extra_records})
    return Message(content=content, reply_to=request)


def _request(node: int, server_round: int) -> Message:
    message = Message(content=RecordDict(), dst_node_id=node, message_type="train", group_id=str(server_round))
    message.metadata.__dict__["_message_id"] = f"request-{node}-{server_round}"
    return message


def _good_gradients(rng: np.random.Generator, scale: float = 0.01) -> dict:
    return {n: (scale * rng.standard_normal(tuple(t.shape))).astype(np.float32) for n, t in _params().items()}


def _state(strategy: DiLoCo) -> dict:
    return {**{f"p.{n}": t.clone() for n, t in strategy.params.items()},
            **{f"m.{n}": t.clone() for n, t in strategy.momentum_buffer.items()}}


def _assert_same_state(a: DiLoCo, b: DiLoCo) -> None:
    """Equal up to the rounding of summing the same good gradients in another order."""
    sa, sb = _state(a), _state(b)
    for key in sa:
        assert torch.isfinite(sa[key]).all()
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-7, msg=key)


def test_an_outer_gradient_far_above_the_rounds_median_is_rejected_wherever_it_comes():
    rng = np.random.default_rng(0)
    good = [_good_gradients(rng) for _ in range(4)]
    huge = {n: a * 1000 for n, a in _good_gradients(rng).items()}
    for position in range(5):  # first (held before a median exists), middle, last
        clean, attacked = _strategy(outlier_norm_ratio=10.0), _strategy(outlier_norm_ratio=10.0)
        clean_requests = list(clean.configure_train(1))
        requests = list(attacked.configure_train(1))
        clean.aggregate_train(1, [_reply(clean_requests[i], g) for i, g in enumerate(good)])
        order = good[:position] + [huge] + good[position:]
        attacked.aggregate_train(1, [_reply(requests[i], g) for i, g in enumerate(order)])
        stats = attacked.history[-1]
        assert stats.rejected == 1 and stats.participants == 4
        # Same set of good gradients (in another order): the same average up to rounding.
        _assert_same_state(attacked, clean)


def test_the_norm_check_can_be_disabled():
    rng = np.random.default_rng(1)
    strategy = _strategy(outlier_norm_ratio=0.0)
    requests = list(strategy.configure_train(1))
    grads = [_good_gradients(rng) for _ in range(4)] + [{n: a * 1000 for n, a in _good_gradients(rng).items()}]
    strategy.aggregate_train(1, [_reply(r, g) for r, g in zip(requests, grads)])
    assert strategy.history[-1].participants == 5


def test_oversized_late_foreign_and_duplicate_replies_are_rejected(caplog):
    rng = np.random.default_rng(2)
    strategy = _strategy(outlier_norm_ratio=10.0)
    clean = _strategy(outlier_norm_ratio=10.0)
    requests = list(strategy.configure_train(1))
    good = [_good_gradients(rng) for _ in range(3)]
    clean.aggregate_train(1, [_reply(r, g) for r, g in zip(list(clean.configure_train(1)), good)])

    late_request = _request(node=13, server_round=7)
    stranger = _request(node=99, server_round=1)
    padding = ConfigRecord({"junk": "x" * 200_000})
    bad = [
        _reply(requests[3], good[0], padding=padding),               # oversized
        _reply(late_request, good[0]),                                # answers a closed round
        _reply(stranger, good[0]),                                    # not a node of the run
        _reply(requests[0], good[0]),                                 # node 10 twice
        _reply(requests[4], good[0], metrics={"train_loss": float("nan")}),
        _reply(requests[4], {**good[0], "b": np.zeros(5, np.float16)}),
    ]
    strategy.aggregate_train(1, [_reply(r, g) for r, g in zip(requests, good)] + bad)
    assert strategy.history[-1].participants == 3
    assert strategy.history[-1].rejected == len(bad)
    _assert_same_state(strategy, clean)
    text = caplog.text
    for needle in ("exceeds the limit", "not round 1", "not one of this run's nodes", "second reply",
                   "not a finite number"):
        assert needle in text


def _malformed(request: Message, rng: random.Random, shapes: dict) -> Message:
    """One reply broken in one of many ways, chosen at random."""
    good = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    name = rng.choice(list(shapes))
    kind = rng.randrange(15)
    if kind == 0:
        return Message(Error(code=rng.randrange(100), reason="boom"), reply_to=request)
    if kind == 1:
        return _reply(request, {**good, name: np.full(shapes[name], rng.choice([np.nan, np.inf, -np.inf]),
                                                      np.float32)})
    if kind == 2:
        return _reply(request, {**good, name: np.zeros(tuple(reversed(shapes[name])) + (1,), np.float32)})
    if kind == 3:
        return _reply(request, {**good, name: np.zeros(shapes[name], rng.choice([np.float64, np.int32,
                                                                                 np.float16, np.uint8]))})
    if kind == 4:
        return _reply(request, {k: v for k, v in good.items() if k != name})
    if kind == 5:
        return _reply(request, {**good, f"{name}_extra": np.zeros(3, np.float32)})
    if kind == 6:
        return _reply(request, good, metrics={"tokens": rng.choice([0, -5])})
    if kind == 7:
        return _reply(request, good, metrics={rng.choice(["train_loss", "compute_seconds"]): float("inf")})
    if kind == 8:
        content = RecordDict({OUTER_GRADIENT_KEY: to_array_record(good)})
        return Message(content=content, reply_to=request)
    if kind == 9:
        return Message(content=RecordDict({METRICS_KEY: MetricRecord({"tokens": 1})}), reply_to=request)
    if kind == 10:
        return _reply(request, good, padding=ConfigRecord({"x": "y" * rng.randrange(100_000, 300_000)}))
    if kind == 11:
        return _reply(request, {n: np.full(s, 1e30, np.float32) for n, s in shapes.items()})  # norm outlier
    if kind == 12:
        return Message(content=RecordDict({OUTER_GRADIENT_KEY: ArrayRecord()}), reply_to=request)
    if kind == 13:  # a packed record whose index points past its bytes
        reply = _reply(request, good)
        reply.content[OUTER_GRADIENT_KEY][INDEX_KEY] = Array(np.frombuffer(
            json.dumps([[name, "<f4", [10**8], 0]]).encode(), np.uint8))
        return reply
    content = RecordDict({METRICS_KEY: MetricRecord({"train_loss": 1.0, "tokens": 10, "compute_seconds": 1.0,
                                                     "idle_seconds": 0.0})})
    content[OUTER_GRADIENT_KEY] = to_array_record({n: np.zeros(s, np.float32).ravel() for n, s in shapes.items()})
    return Message(content=content, reply_to=request)


@pytest.mark.parametrize("precision", ["fp32", "fp4"])
def test_fuzz_random_malformed_replies_never_move_the_global_state(precision):
    rng = random.Random(1234)
    np_rng = np.random.default_rng(5)
    shapes = {n: tuple(t.shape) for n, t in _params().items()}
    clean = _strategy(outlier_norm_ratio=10.0, wire_precision=precision)
    fuzzed = _strategy(outlier_norm_ratio=10.0, wire_precision=precision)
    for server_round in range(1, 9):
        clean_requests = list(clean.configure_train(server_round))
        requests = list(fuzzed.configure_train(server_round))
        good_count = rng.randrange(3, 6)
        good = [encode_tensors({n: torch.from_numpy(a) for n, a in _good_gradients(np_rng).items()}, precision)
                for _ in range(good_count)]
        clean.aggregate_train(server_round, [_reply(clean_requests[i], g) for i, g in enumerate(good)])
        # Good replies in random order, then garbage: from nodes without a good reply
        # anywhere, from the others only after their good one (a node's first reply is its
        # reply; Flower delivers one per request).
        ordered = [_reply(requests[i], g) for i, g in enumerate(good)]
        rng.shuffle(ordered)
        for _ in range(rng.randrange(5, 25)):
            node = rng.randrange(len(requests))
            earliest = 0
            if node < good_count:
                earliest = 1 + next(i for i, r in enumerate(ordered)
                                    if r.metadata.src_node_id == NODES[node])
            ordered.insert(rng.randrange(earliest, len(ordered) + 1), _malformed(requests[node], rng, shapes))
        fuzzed.aggregate_train(server_round, ordered)
        assert fuzzed.history[-1].participants == good_count
        _assert_same_state(fuzzed, clean)
