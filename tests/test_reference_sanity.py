"""The reference (tests/reference.py) checked on properties the formulas imply.

The formulas, and the list of properties, are in docs/algorithms.md.

Each test names the wrong implementation it would catch, so the oracle is itself trusted before
the Flower runs are compared with it.
"""

import pytest
import torch

from clients.worker import build_trainer
from tests.conftest import small_config
from tests.reference import fragment_names, reference_run
from tests.tolerance import assert_same_trajectory


def _theta0(cfg):
    return build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _names(num_blocks):
    per_block = ["attn.wq.weight", "mlp.w1.weight"]
    blocks = [f"blocks.{i}.{p}" for i in range(num_blocks) for p in per_block]
    return ["embed.weight", *blocks, "norm.weight", "head.weight"]


def _blocks_of(names):
    return sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})


@pytest.mark.parametrize("num_blocks", [4, 6])
@pytest.mark.parametrize("num_fragments", [1, 2, 3])
@pytest.mark.parametrize("pattern", ["strided", "sequential"])
def test_fragment_split(num_blocks, num_fragments, pattern):
    names = _names(num_blocks)
    fragments = fragment_names(names, num_fragments, pattern)
    assert len(fragments) == num_fragments
    # Every parameter in exactly one fragment, whole blocks only.
    assert sorted(n for f in fragments for n in f) == sorted(names)
    for fragment in fragments:
        for block in _blocks_of(fragment):
            assert all(f"blocks.{block}.{p}" in fragment for p in ("attn.wq.weight", "mlp.w1.weight"))
    # Non-block parameters live in the last fragment.
    for name in ("embed.weight", "norm.weight", "head.weight"):
        assert name in fragments[-1]
    blocks = [_blocks_of(f) for f in fragments]
    if pattern == "strided":
        assert blocks == [list(range(p, num_blocks, num_fragments)) for p in range(num_fragments)]
    else:
        # Contiguous chunks, the first ones one larger (numpy.array_split).
        expected = {(4, 1): [[0, 1, 2, 3]], (4, 2): [[0, 1], [2, 3]], (4, 3): [[0, 1], [2], [3]],
                    (6, 1): [list(range(6))], (6, 2): [[0, 1, 2], [3, 4, 5]],
                    (6, 3): [[0, 1], [2, 3], [4, 5]]}
        assert blocks == expected[num_blocks, num_fragments]


def test_fragment_split_explicit_examples():
    names = _names(6)
    strided = fragment_names(names, 3, "strided")
    assert _blocks_of(strided[0]) == [0, 3] and _blocks_of(strided[2]) == [2, 5]
    sequential = fragment_names(names, 4, "sequential")
    assert [_blocks_of(f) for f in sequential] == [[0, 1], [2, 3], [4], [5]]
    assert fragment_names(names, 1, "strided") == [names]


def test_rejects_quantized_wire(tmp_path):
    with pytest.raises(ValueError, match="fp32"):
        reference_run(small_config(tmp_path, wire_precision="bf16"))


@pytest.mark.parametrize("streaming", [False, True])
def test_one_worker_unit_outer_lr_is_plain_adamw(tmp_path, streaming):
    # M = 1, η = 1, μ = 0: θ ← θ − (θ − local) = local, so the run is one uninterrupted AdamW
    # run. A flipped outer-gradient sign moves θ the other way and fails this. (Streamed, the
    # fragments are synced at different steps, so there the local model is the one compared.)
    extra = {"streaming": True, "fragments": 2} if streaming else {}
    cfg = small_config(tmp_path, num_clients=1, rounds=3, inner_steps=4, outer_lr=1.0,
                       outer_momentum=0.0, **extra)
    result = reference_run(cfg)
    plain = build_trainer(cfg, 0, 1, "cpu")
    start = plain.parameters_fp32()
    for _ in range(cfg.rounds * cfg.inner_steps):
        plain.train_step()
    # θ − (θ − x) is x only up to fp32 rounding, which AdamW can amplify on ~0 gradients
    # (tests/tolerance.py).
    compared = result.worker_local_params[0] if streaming else result.global_params
    assert_same_trajectory(compared, plain.parameters_fp32(), start)


@pytest.mark.parametrize("delay", [1, 2])
@pytest.mark.parametrize("fragments", [1, 2])
def test_one_worker_eager_equals_diloco_exactly(tmp_path, delay, fragments):
    # With M = 1 the definitional form is Δ̃ = 1·Δ(t) + (empty sum) = Δ(t) for every d: the
    # stale terms only come from other workers. (The rewritten form Δ(t−d) + Δ(t) − Δ(t−d)
    # would agree only up to rounding; an eager that drops the fresh term fails outright.)
    extra = {"streaming": True, "fragments": fragments} if fragments > 1 else {}
    base = {"num_clients": 1, "rounds": 4, "inner_steps": 4, **extra}
    diloco = reference_run(small_config(tmp_path, algorithm="diloco", **base))
    eager = reference_run(small_config(tmp_path, algorithm="eager", delay=delay, **base))
    _assert_equal(eager.global_params, diloco.global_params)
    _assert_equal(eager.worker_local_params[0], diloco.worker_local_params[0])


def test_streaming_one_fragment_no_overlap_equals_diloco_exactly(tmp_path):
    base = {"rounds": 3, "inner_steps": 4, "algorithm": "diloco"}
    diloco = reference_run(small_config(tmp_path, **base))
    streamed = reference_run(small_config(tmp_path, streaming=True, fragments=1, overlap_steps=0,
                                          mixing=0.0, **base))
    assert len(streamed.averages) == len(diloco.averages) == 3
    _assert_equal(streamed.global_params, diloco.global_params)


@pytest.mark.parametrize("delay", [1, 2])
def test_delayed_applies_nothing_at_the_first_outer_step(tmp_path, delay):
    cfg = small_config(tmp_path, algorithm="delayed", delay=delay, rounds=1, inner_steps=4)
    theta0 = _theta0(cfg)
    delayed = reference_run(cfg)
    _assert_equal(delayed.global_params, theta0)
    for m in range(cfg.num_clients):  # and every worker restarts from θ0
        _assert_equal(delayed.worker_local_params[m], theta0)
    diloco = reference_run(cfg.replace(algorithm="diloco"))
    assert not torch.equal(diloco.global_params["head.weight"], theta0["head.weight"])


@pytest.mark.parametrize("delay,fragments", [(1, 1), (2, 1), (1, 2)])
def test_delayed_with_plain_sgd_sums_the_stale_averages(tmp_path, delay, fragments):
    # μ = 0, η = 1: θ(T) = θ0 − Σ_{t ≤ T−d} Δ(t); the last d averages are not applied yet.
    # Streamed, per fragment: the stale average is the one of the same fragment, d·P rounds ago.
    extra = {"streaming": True, "fragments": fragments} if fragments > 1 else {}
    cfg = small_config(tmp_path, algorithm="delayed", delay=delay, rounds=3, inner_steps=4,
                       outer_lr=1.0, outer_momentum=0.0, **extra)
    P, R = cfg.num_fragments, cfg.flower_rounds
    theta0 = _theta0(cfg)
    result = reference_run(cfg)
    for p, names in enumerate(fragment_names(list(theta0), P, cfg.fragment_pattern)):
        applied = [r for r in range(1, R - delay * P + 1) if (r - 1) % P == p]
        for name in names:
            expected = theta0[name] - sum(result.averages[r - 1][name] for r in applied)
            torch.testing.assert_close(result.global_params[name], expected, rtol=0, atol=1e-6)
    last = fragment_names(list(theta0), P, cfg.fragment_pattern)[(R - 1) % P]
    for m in range(cfg.num_clients):  # every worker restarts the last synced fragment from θ
        for name in last:
            assert torch.equal(result.worker_local_params[m][name], result.global_params[name])


@pytest.mark.parametrize("delay,fragments", [(1, 1), (2, 1), (1, 2)])
def test_eager_with_plain_sgd_applies_every_contribution_once(tmp_path, delay, fragments):
    # With μ = 0, Σ_t Δ̃_m(t) = Σ_{t<T} Δ(t) + w_m·Δ_m(T) (d = 1). For d outer steps
    # and per fragment p: Σ_{t ≤ T−d} Δ_p(t) + w_m·Σ_{T−d < t ≤ T} Δ_{m,p}(t). With η = 1 the
    # worker's outer movement is minus that sum. Mixing with (M−1)/M·Δ(t−d) instead counts the
    # worker's own stale term twice and misses this by (w_m/M)·Σ(Δ_j − Δ_m), checked below to be
    # far above the tolerance.
    extra = {"streaming": True, "fragments": fragments} if fragments > 1 else {}
    cfg = small_config(tmp_path, algorithm="eager", delay=delay, num_clients=2, rounds=3,
                       inner_steps=4, outer_lr=1.0, outer_momentum=0.0, **extra)
    M, P, R = cfg.num_clients, cfg.num_fragments, cfg.flower_rounds
    theta0 = _theta0(cfg)
    result = reference_run(cfg)
    fragments_ = fragment_names(list(theta0), P, cfg.fragment_pattern)
    for m in range(M):
        for p, names in enumerate(fragments_):
            rounds_p = [r for r in range(1, R + 1) if (r - 1) % P == p]
            for name in names:
                total = sum(result.averages[r - 1][name] for r in rounds_p if r <= R - delay * P)
                total = total + sum(result.outer_gradients[r - 1][m][name] / M
                                    for r in rounds_p if r > R - delay * P)
                moved = result.worker_outer_params[m][name] - theta0[name]
                torch.testing.assert_close(moved, -total, rtol=0, atol=1e-6)
    # The workers really differ, so a double-counted stale term would show.
    first, second = result.outer_gradients[0]
    assert max((first[n] - second[n]).abs().max() for n in first) > 1e-3


def test_eager_mean_follows_outer_on_mixed_averages(tmp_path):
    # Uniform weights, common start, d = 1: the mean of the workers' outer parameters
    # follows θ̄(t) = Outer(θ̄(t−1), (1 − 1/M)·Δ(t−1) + (1/M)·Δ(t)), with Nesterov momentum too.
    cfg = small_config(tmp_path, algorithm="eager", delay=1, num_clients=2, rounds=4, inner_steps=4)
    M = cfg.num_clients
    theta0 = _theta0(cfg)
    result = reference_run(cfg)
    tracked = {n: t.clone() for n, t in theta0.items()}
    optimizer = torch.optim.SGD(list(tracked.values()), lr=cfg.outer_lr,
                                momentum=cfg.outer_momentum, nesterov=True)
    previous = {n: torch.zeros_like(t) for n, t in theta0.items()}
    for average in result.averages:
        for name, param in tracked.items():
            param.grad = (1 - 1 / M) * previous[name] + (1 / M) * average[name]
        optimizer.step()
        previous = average
    for name in theta0:
        torch.testing.assert_close(result.global_params[name], tracked[name], rtol=0, atol=1e-5)
    # ... and the workers do disagree (otherwise "mean" would be untested).
    assert not torch.equal(result.worker_outer_params[0]["head.weight"],
                           result.worker_outer_params[1]["head.weight"])


def test_streaming_outer_gradient_is_taken_at_the_sync_not_when_applied(tmp_path):
    # M = 1, η = 1, μ = 0, τ = 1, α = 1: the merge keeps the local copy untouched, so the worker
    # is one plain AdamW run, and each fragment's θ_p ← θ_p − (θ_p − local(s(r))) = the local
    # model at its last sync step s(r) = r·H/P, not at s(r) + τ. Catches a swapped α, a Δ taken
    # after the τ overlap steps, and fragments synced at the wrong steps.
    cfg = small_config(tmp_path, num_clients=1, rounds=2, inner_steps=4, streaming=True,
                       fragments=2, overlap_steps=1, mixing=1.0, outer_lr=1.0, outer_momentum=0.0)
    P, S, R = cfg.num_fragments, cfg.sync_interval, cfg.flower_rounds
    result = reference_run(cfg)
    plain = build_trainer(cfg, 0, 1, "cpu")
    snapshots = {}
    for step in range(1, R * S + cfg.overlap_steps + 1):
        plain.train_step()
        snapshots[step] = plain.parameters_fp32()
    _assert_equal(result.worker_local_params[0], snapshots[R * S + cfg.overlap_steps])
    fragments = fragment_names(list(snapshots[1]), P, cfg.fragment_pattern)
    for p, names in enumerate(fragments):
        last_sync = max(r for r in range(1, R + 1) if (r - 1) % P == p) * S
        for name in names:
            torch.testing.assert_close(result.global_params[name], snapshots[last_sync][name],
                                       rtol=0, atol=1e-6)
            assert not torch.equal(snapshots[last_sync][name], snapshots[last_sync + 1][name])


@pytest.mark.parametrize("mixing", [0.0, 0.3, 0.5])
def test_streaming_overlap_merges_tau_steps_after_the_sync(tmp_path, mixing):
    # M = 1, η = 1, μ = 0: the outer step gives θ_p = local_p(s(r)) (the snapshot at the sync),
    # so the run is plain AdamW where, τ steps after each sync, fragment p is merged as
    # α·local_p + (1 − α)·snapshot_p. Replayed here with one trainer; catches an average applied
    # at the sync instead of τ steps later, and a swapped α.
    cfg = small_config(tmp_path, num_clients=1, rounds=2, inner_steps=4, streaming=True,
                       fragments=2, overlap_steps=1, mixing=mixing, outer_lr=1.0,
                       outer_momentum=0.0)
    P, S, R, tau = cfg.num_fragments, cfg.sync_interval, cfg.flower_rounds, cfg.overlap_steps
    result = reference_run(cfg)
    replay = build_trainer(cfg, 0, 1, "cpu")
    start = replay.parameters_fp32()
    fragments = fragment_names(list(replay.parameters_fp32()), P, cfg.fragment_pattern)
    snapshots = {}
    for step in range(1, R * S + tau + 1):
        replay.train_step()
        if step % S == 0:
            snapshots[step + tau] = (fragments[(step // S - 1) % P], replay.parameters_fp32())
        if step in snapshots:
            names, snapshot = snapshots.pop(step)
            params = replay.parameters_fp32()
            params.update({n: mixing * params[n] + (1 - mixing) * snapshot[n] for n in names})
            replay.load_parameters(params)
    assert_same_trajectory(result.worker_local_params[0], replay.parameters_fp32(), start)
