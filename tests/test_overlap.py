"""The overlap variants' properties (docs/algorithms.md#what-the-tests-check), on the pure
math and on the real strategy and workers (driven in process)."""

import numpy as np
import pytest
import torch

from clients.worker import build_trainer
from fl_diloco.model import Transformer, count_parameters, model_config
from strategies.fragments import fragment_names, rounds_in_flight, select, stale_round
from strategies.outer_optimizer import OuterOptimizer, eager_outer_gradient, zeros_like
from tests.conftest import small_config
from strategies.diloco import DiLoCo
from tests import reference
from tests.in_process import run_in_process
from tests.tolerance import assert_same_trajectory


def _random(seed, shape=(5, 3)):
    return {"w": torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


def _close(a, b, atol=1e-6):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


def _eager_trajectory(M, T, d, lr, momentum):
    """M workers applying the eager rule to random outer gradients Δ_m(t), t = 1..T."""
    deltas = [[_random(1000 * t + m) for m in range(M)] for t in range(T + 1)]
    deltas[0] = [zeros_like(_random(0)) for _ in range(M)]  # Δ(0) = 0
    averages = [{n: sum(dm[n] for dm in d_t) / M for n in d_t[0]} for d_t in deltas]
    thetas = [_random(7) for _ in range(M)]
    start = {n: t.clone() for n, t in thetas[0].items()}
    optimizers = [OuterOptimizer(theta, lr, momentum) for theta in thetas]
    mean = {n: t.clone() for n, t in start.items()}
    mean_optimizer = OuterOptimizer(mean, lr, momentum)
    for t in range(1, T + 1):
        k = max(0, t - d)
        for m in range(M):
            optimizers[m].step(eager_outer_gradient(averages[k], deltas[t][m], deltas[k][m], 1 / M))
        # What the server tracks from the averages alone (the mean's closed form).
        mean_optimizer.step(eager_outer_gradient(averages[k], averages[t], averages[k], 1 / M))
    return start, thetas, mean, deltas, averages


@pytest.mark.parametrize("d", [1, 2])
def test_mean_of_the_workers_follows_the_closed_form(d):
    _, thetas, mean, _, _ = _eager_trajectory(M=3, T=6, d=d, lr=0.7, momentum=0.9)
    _close(mean, {n: sum(th[n] for th in thetas) / 3 for n in mean}, atol=1e-5)


def test_with_sgd_outer_every_contribution_is_applied_exactly_once():
    # μ = 0, η = 1: θ_m(T) = θ(0) − Σ_t Δ̃_m(t) = θ(0) − (Σ_{t<T} Δ(t) + w_m·Δ_m(T)).
    M, T = 3, 5
    start, thetas, _, deltas, averages = _eager_trajectory(M=M, T=T, d=1, lr=1.0, momentum=0.0)
    for m in range(M):
        applied = {n: sum(averages[t][n] for t in range(1, T)) + deltas[T][m][n] / M for n in start}
        _close(thetas[m], {n: start[n] - applied[n] for n in start}, atol=1e-5)


def test_the_double_counting_mix_breaks_that_property():
    # The known wrong rule, w_m·Δ_m(t) + (M−1)/M·Δ(t−1), keeps the worker's own stale term.
    M = 3
    fresh, stale_own = _random(1), _random(2)
    others = [_random(3), _random(4)]
    stale_average = {"w": (stale_own["w"] + others[0]["w"] + others[1]["w"]) / M}
    right = eager_outer_gradient(stale_average, fresh, stale_own, 1 / M)
    definition = (fresh["w"] + others[0]["w"] + others[1]["w"]) / M  # w_m Δ_m(t) + Σ_{k≠m} w_k Δ_k(t−1)
    wrong = fresh["w"] / M + (M - 1) / M * stale_average["w"]
    torch.testing.assert_close(right["w"], definition)
    assert not torch.allclose(wrong, definition, atol=1e-3)


def test_identical_workers_mix_their_fresh_and_stale_averages():
    M, fresh, stale = 4, _random(1), _random(2)
    mixed = eager_outer_gradient(stale, fresh, stale, 1 / M)
    torch.testing.assert_close(mixed["w"], fresh["w"] / M + (M - 1) / M * stale["w"])


def test_delayed_is_the_eager_rule_without_the_own_term():
    stale, fresh, own = _random(1), _random(2), _random(3)
    assert torch.equal(eager_outer_gradient(stale, fresh, own, 0.0)["w"], stale["w"])


def test_schedule_helpers():
    assert [stale_round(r, 1, 1) for r in (1, 2, 3)] == [0, 1, 2]
    assert [stale_round(r, 2, 3) for r in (1, 6, 7)] == [-5, 0, 1]  # same fragment, 2 syncs back
    assert rounds_in_flight(0, 4) == 1 and rounds_in_flight(1, 1) == 1 and rounds_in_flight(2, 2) == 4


def test_fragments_partition_the_model():
    shapes = {f"blocks.{i}.{p}": (8, 8) for i in range(6) for p in ("a", "b")}
    shapes |= {"embed.weight": (100, 8), "norm.weight": (8,)}
    strided = fragment_names(shapes, 3, "strided")
    assert [k for k in strided[0] if k.startswith("blocks")] == \
        ["blocks.0.a", "blocks.0.b", "blocks.3.a", "blocks.3.b"]
    # The non-block rows are shared out: 808 of them over 3 fragments of 256 block elements.
    assert [k for f in strided for k in f if not k.startswith("blocks")] == \
        ["embed.weight[0:34]", "embed.weight[34:67]", "embed.weight[67:100]", "norm.weight"]
    sequential = fragment_names(shapes, 4, "sequential")
    assert [sorted({n.split(".")[1] for n in f if n.startswith("blocks")}) for f in sequential] == \
        [["0", "1"], ["2", "3"], ["4"], ["5"]]
    for split in (strided, sequential):  # every element of every tensor in exactly one fragment
        counts = {n: np.zeros(s, dtype=np.int64) for n, s in shapes.items()}
        for keys in split:
            for rows in select(counts, keys).values():
                rows += 1
        assert all((c == 1).all() for c in counts.values())
    with pytest.raises(ValueError, match="between 1 and"):
        fragment_names(shapes, 7, "strided")


PRESET_SPLITS = [(preset, p) for preset in ("tiny-1m", "tiny-10m", "35m", "1b") for p in (2, 4, 8)
                 if p <= model_config(preset).n_layers]  # P at most one fragment per block


def _preset_shapes(preset):
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Transformer(model_config(preset)).named_parameters()}


@pytest.mark.parametrize("preset, num_fragments", PRESET_SPLITS)
def test_fragment_split_matches_the_independent_reference(preset, num_fragments):
    # tests/reference.py splits from the formulas on its own; the Flower runs are checked
    # against it only on tiny configs, so compare the two splits on the real presets too.
    shapes = _preset_shapes(preset)
    for pattern in ("strided", "sequential"):
        assert fragment_names(shapes, num_fragments, pattern) == \
            reference.fragment_names(shapes, num_fragments, pattern), pattern


@pytest.mark.parametrize("preset, num_fragments", PRESET_SPLITS)
def test_largest_fragment_is_about_one_pth_of_the_model(preset, num_fragments):
    # Streaming exists to divide the peak bytes per sync by P: no fragment above 1.1/P.
    cfg = model_config(preset)
    shapes = _preset_shapes(preset)
    empty = {n: np.empty(s, dtype=np.uint8) for n, s in shapes.items()}
    for pattern in ("strided", "sequential"):
        sizes = [sum(v.size for v in select(empty, keys).values())
                 for keys in fragment_names(shapes, num_fragments, pattern)]
        assert sum(sizes) == count_parameters(cfg)
        assert max(sizes) <= 1.1 * count_parameters(cfg) / num_fragments


# ----- the same properties through the real strategy and workers -----

def _theta0(cfg):
    return build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()


def _worker_outer_params(worker):
    """The worker's outer parameters, its fragments' rows put back into whole tensors."""
    held = {n: torch.empty(p.shape) for n, p in worker.trainer.model.named_parameters()}
    for fragment in worker.fragments:
        for key, rows in select(held, fragment.keys).items():
            rows.copy_(fragment.outer.params[key])
    return held


def test_one_eager_worker_is_diloco(tmp_path):
    cfg = small_config(tmp_path, num_clients=1, rounds=4, eval_every=100)
    diloco, _ = run_in_process(cfg)
    eager, _ = run_in_process(cfg.replace(algorithm="eager"))
    # Δ(t−1) + (Δ(t) − Δ(t−1)) is Δ(t) up to one rounding, which AdamW's normalised steps
    # can grow on parameters with a near-zero gradient (tests/tolerance.py).
    assert_same_trajectory(eager.params, diloco.params, _theta0(cfg))


def test_server_tracks_the_mean_of_the_eager_workers(tmp_path):
    cfg = small_config(tmp_path, algorithm="eager", num_clients=3, rounds=5, eval_every=100)
    # Stop one round short: the workers then hold θ_m after the last applied update.
    strategy, workers = run_in_process(cfg, rounds=4)
    thetas = [_worker_outer_params(w) for w in workers]
    assert not torch.equal(thetas[0]["embed.weight"], thetas[1]["embed.weight"])  # they differ
    _close(strategy.params, {n: sum(th[n] for th in thetas) / 3 for n in strategy.params}, atol=1e-6)


def test_delayed_applies_nothing_at_the_first_outer_step(tmp_path):
    cfg = small_config(tmp_path, algorithm="delayed", rounds=2, eval_every=100)
    strategy, workers = run_in_process(cfg, rounds=1)
    theta0 = _theta0(cfg)
    for params in (strategy.params, *map(_worker_outer_params, workers)):
        for name, value in theta0.items():
            assert torch.equal(params[name], value)


def test_streaming_with_one_fragment_and_no_overlap_is_diloco(tmp_path):
    cfg = small_config(tmp_path, rounds=3, eval_every=100)
    diloco, _ = run_in_process(cfg)
    streaming, _ = run_in_process(cfg.replace(streaming=True, fragments=1))
    for name in diloco.params:
        assert torch.equal(streaming.params[name], diloco.params[name])


def _bytes_up_per_round(strategy):
    return [s.bytes_up for s in strategy.history]


def test_fp4_wire_sends_at_most_0_14_of_fp32_bytes(tmp_path):
    cfg = small_config(tmp_path, rounds=2, eval_every=100)
    fp32, _ = run_in_process(cfg)
    fp4, _ = run_in_process(cfg.replace(wire_precision="fp4"))
    bf16, _ = run_in_process(cfg.replace(wire_precision="bf16"))
    for quantized, bound in ((fp4, 0.14), (bf16, 0.51)):
        assert sum(_bytes_up_per_round(quantized)) <= bound * sum(_bytes_up_per_round(fp32))
        # The average comes down quantized too (round 2 carries round 1's average).
        assert quantized.history[1].bytes_down <= bound * fp32.history[1].bytes_down


def test_streaming_rounds_carry_one_fragment(tmp_path):
    cfg = small_config(tmp_path, rounds=2, eval_every=100)
    full, _ = run_in_process(cfg)
    streaming, _ = run_in_process(cfg.replace(streaming=True, fragments=2))
    assert len(streaming.history) == 2 * len(full.history)
    full_bytes = full.history[0].bytes_up
    for stats in streaming.history:  # each round carries about half of a full sync
        assert stats.bytes_up <= 0.55 * full_bytes
    # Over one outer step (P rounds) every parameter crossed once, as in one DiLoCo round.
    assert sum(s.bytes_up for s in streaming.history[:2]) == pytest.approx(full_bytes, rel=0.05)


# ----- quantized wire: the server and the workers apply the same decoded averages -----

def _run_recording_server_params(cfg, monkeypatch):
    """The in-process run, and the server's θ after each round."""
    after_round = []
    aggregate = DiLoCo.aggregate_train

    def recording(self, server_round, replies):
        result = aggregate(self, server_round, replies)
        after_round.append({n: t.clone() for n, t in self.params.items()})
        return result
    monkeypatch.setattr(DiLoCo, "aggregate_train", recording)
    strategy, workers = run_in_process(cfg)
    return after_round, workers


QUANTIZED_RUNS = [pytest.param(wire, extra, id=f"{wire}{'-streaming' if extra else ''}")
                  for wire in ("fp8", "fp4") for extra in ({}, {"streaming": True, "fragments": 2})]


@pytest.mark.parametrize("algorithm", ["diloco", "delayed"])
@pytest.mark.parametrize("wire,extra", QUANTIZED_RUNS)
def test_quantized_wire_keeps_every_worker_on_the_servers_parameters(tmp_path, monkeypatch, algorithm,
                                                                    wire, extra):
    # The workers apply the average as it arrives, decoded from the wire; the server must
    # step with exactly that, not with its fp32 average, or the two drift apart bit by bit.
    cfg = small_config(tmp_path, algorithm=algorithm, wire_precision=wire, num_clients=3, rounds=3,
                       eval_every=100, **extra)
    after_round, workers = _run_recording_server_params(cfg, monkeypatch)
    # A worker stops at the last sync without applying that round's average, so it holds the
    # server's θ after the round before.
    server = after_round[-2]
    for worker in workers:
        held = _worker_outer_params(worker)
        for name, value in server.items():
            assert torch.equal(held[name], value), f"{name} differs from the server's"
    assert not torch.equal(server["embed.weight"], after_round[0]["embed.weight"])


@pytest.mark.parametrize("wire,extra", QUANTIZED_RUNS)
def test_quantized_wire_eager_server_tracks_the_workers_mean(tmp_path, monkeypatch, wire, extra):
    cfg = small_config(tmp_path, algorithm="eager", wire_precision=wire, num_clients=3, rounds=3,
                       eval_every=100, **extra)
    after_round, workers = _run_recording_server_params(cfg, monkeypatch)
    thetas = [_worker_outer_params(w) for w in workers]
    assert not torch.equal(thetas[0]["embed.weight"], thetas[1]["embed.weight"])
    # Pure arithmetic on the same decoded averages, no training in between: a few ulps.
    for name, value in after_round[-2].items():
        torch.testing.assert_close(sum(th[name] for th in thetas) / 3, value, rtol=1e-5, atol=1e-6)
