"""The DiLoCo strategy: a clean round applies exactly one outer step of the average, and
malformed replies are rejected without touching the global state."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict

from strategies.diloco import METRICS_KEY, OUTER_GRADIENT_KEY, DiLoCo
from strategies.outer_optimizer import nesterov_outer_step, zeros_like
from strategies.wire import to_array_record

pytestmark = pytest.mark.usefixtures("task_identity")


def _params():
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


def _reply(request: Message, grads: dict, tokens: int = 100, **metric_overrides) -> Message:
    metrics = {"train_loss": 2.0, "tokens": tokens, "compute_seconds": 1.0, "idle_seconds": 0.1,
               **metric_overrides}
    content = RecordDict({OUTER_GRADIENT_KEY: to_array_record(grads), METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=request)


def test_round_applies_nesterov_step_of_the_weighted_average():
    params = _params()
    strategy = DiLoCo(params, node_ids=[10, 11], outer_lr=0.7, outer_momentum=0.9, weighting="tokens")
    requests = list(strategy.configure_train(1))
    assert [m.metadata.dst_node_id for m in requests] == [10, 11]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in requests)
    g1 = {n: np.ones(t.shape, np.float32) for n, t in params.items()}
    g2 = {n: np.full(t.shape, 4.0, np.float32) for n, t in params.items()}
    strategy.aggregate_train(1, [_reply(requests[0], g1, tokens=100), _reply(requests[1], g2, tokens=300)])

    expected = {n: t.clone() for n, t in params.items()}
    average = {n: torch.full(t.shape, (1 * 100 + 4 * 300) / 400) for n, t in params.items()}
    nesterov_outer_step(expected, average, zeros_like(expected), 0.7, 0.9)
    for n in params:
        torch.testing.assert_close(strategy.params[n], expected[n])
    stats = strategy.history[-1]
    assert stats.participants == 2 and stats.tokens == 400 and stats.rejected == 0
    assert stats.bytes_up > 2 * 15 * 4 and stats.bytes_down > 2 * 15 * 4  # at least the raw fp32


def _malformed_replies(request: Message, params: dict) -> list[Message]:
    good = {n: np.zeros(t.shape, np.float32) for n, t in params.items()}
    nan = {**good, "w": np.full(params["w"].shape, np.nan, np.float32)}
    inf = {**good, "b": np.full(params["b"].shape, np.inf, np.float32)}
    wrong_shape = {**good, "w": np.zeros((3, 4), np.float32)}
    wrong_dtype = {**good, "w": np.zeros(params["w"].shape, np.float64)}
    missing = {"w": good["w"]}
    extra = {**good, "surprise": np.zeros(2, np.float32)}
    no_metrics = Message(content=RecordDict({OUTER_GRADIENT_KEY: to_array_record(good)}), reply_to=request)
    return [
        _reply(request, nan), _reply(request, inf), _reply(request, wrong_shape),
        _reply(request, wrong_dtype), _reply(request, missing), _reply(request, extra),
        _reply(request, good, tokens=0), no_metrics,
        Message(Error(code=0, reason="worker crashed"), reply_to=request),
    ]


def test_malformed_replies_are_rejected_and_leave_the_global_state_untouched(caplog):
    params = _params()
    strategy = DiLoCo(params, node_ids=[7])
    request = list(strategy.configure_train(1))[0]
    replies = _malformed_replies(request, params)
    strategy.aggregate_train(1, replies)
    for n in params:
        assert torch.equal(strategy.params[n], params[n])
        assert torch.count_nonzero(strategy.momentum_buffer[n]) == 0
    # The error reply is the node failing, counted apart from the replies that fail validation.
    assert strategy.history[-1].rejected == len(replies) - 1
    assert strategy.history[-1].unavailable_nodes == [7]


def test_a_bad_reply_does_not_spoil_the_good_ones():
    params = _params()
    strategy = DiLoCo(params, node_ids=[7, 8], outer_lr=1.0, outer_momentum=0.0)
    requests = list(strategy.configure_train(1))
    step = {n: np.full(t.shape, 0.5, np.float32) for n, t in params.items()}
    bad = {**step, "w": np.full(params["w"].shape, np.nan, np.float32)}
    strategy.aggregate_train(1, [_reply(requests[0], step), _reply(requests[1], bad)])
    for n in params:  # lr 1, no momentum: θ ← θ − Δ of the one good reply
        torch.testing.assert_close(strategy.params[n], params[n] - 0.5)
        assert all(math.isfinite(v) for v in strategy.params[n].flatten().tolist())
    assert strategy.history[-1].participants == 1 and strategy.history[-1].rejected == 1
