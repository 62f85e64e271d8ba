"""The reference (tests/reference.py) checked on properties the formulas imply.

The formulas, and the list of properties, are in docs/algorithms.md.

Each test names the wrong implementation it would catch, so the oracle is itself trusted before
the Flower runs are compared with it.
"""

import numpy as np
import pytest
import torch

from clients.worker import build_trainer
from tests.conftest import small_config
from tests.reference import fragment_names, reference_run, take
from tests.tolerance import assert_same_trajectory


def _theta0(cfg):
    return build_trainer(cfg, 0, cfg.num_clients, "cpu").parameters_fp32()


def _shapes_of(params):
    return {n: tuple(t.shape) for n, t in params.items()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _shapes(num_blocks, vocab=40, width=4):
    """A model's parameter shapes: blocks of two matrices, embedding, final norm and head."""
    blocks = {f"blocks.{i}.{p}": (width, width) for i in range(num_blocks)
              for p in ("attn.wq.weight", "mlp.w1.weight")}
    return {"embed.weight": (vocab, width), **blocks, "norm.weight": (width,), "head.weight": (vocab, width)}


def _blocks_of(names):
    return sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})


def _rows_held(fragments, shapes):
    """name → the row indices each fragment holds, concatenated in fragment order."""
    held = {name: [] for name in shapes}
    for keys in fragments:
        for key in keys:
            name, _, rows = key.partition("[")
            first, last = map(int, rows[:-1].split(":")) if rows else (0, shapes[name][0])
            held[name].extend(range(first, last))
    return held


def _elements(keys, shapes):
    """How many elements a fragment's keys cover."""
    return sum(len(rows) * int(np.prod(shapes[n])) // shapes[n][0]
               for n, rows in _rows_held([keys], shapes).items())


@pytest.mark.parametrize("num_blocks", [4, 6])
@pytest.mark.parametrize("num_fragments", [1, 2, 3])
@pytest.mark.parametrize("pattern", ["strided", "sequential"])
def test_fragment_split(num_blocks, num_fragments, pattern):
    shapes = _shapes(num_blocks)
    fragments = fragment_names(shapes, num_fragments, pattern)
    assert len(fragments) == num_fragments
    # Every row of every parameter in exactly one fragment, whole blocks only.
    for name, rows in _rows_held(fragments, shapes).items():
        assert sorted(rows) == list(range(shapes[name][0])), name
    for fragment in fragments:
        for block in _blocks_of(fragment):
            assert all(f"blocks.{block}.{p}" in fragment for p in ("attn.wq.weight", "mlp.w1.weight"))
    # The non-block rows level the fragments: none is more than one row above the mean.
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert max(_elements(f, shapes) for f in fragments) <= total / num_fragments + 4
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
    shapes = _shapes(6)  # blocks of 32 elements, embedding and head 160 each, norm 4: 516 in all
    strided = fragment_names(shapes, 3, "strided")
    # Level 172 = 516 / 3: each fragment has 64 block elements and takes 108 elements of the
    # stream embed (40 rows of 4) · norm (4 rows of 1) · head (40 rows of 4): cuts at 108 and
    # 216, i.e. embedding row 27 and head row (216 − 164) / 4 = 13.
    assert strided[0] == ["embed.weight[0:27]", "blocks.0.attn.wq.weight", "blocks.0.mlp.w1.weight",
                          "blocks.3.attn.wq.weight", "blocks.3.mlp.w1.weight"]
    assert strided[1][0] == "embed.weight[27:40]" and strided[1][-2:] == ["norm.weight", "head.weight[0:13]"]
    assert strided[2][-1] == "head.weight[13:40]" and _blocks_of(strided[2]) == [2, 5]
    sequential = fragment_names(shapes, 4, "sequential")
    assert [_blocks_of(f) for f in sequential] == [[0, 1], [2, 3], [4], [5]]
    # Fragments 2 and 3 hold one block each, so they take more of the stream: level 129, shares
    # 65, 65, 97, 97; cuts at 65 → row 16 (64), 130 → row 32.5, a tie, so the lower row 32 (128),
    # and 227 → head row 15.75 → 16 (228).
    assert [_elements(f, shapes) for f in sequential] == [128, 128, 132, 128]
    assert fragment_names(shapes, 1, "strided") == [list(shapes)]


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
    fragments = fragment_names(_shapes_of(theta0), P, cfg.fragment_pattern)
    for p, keys in enumerate(fragments):
        applied = [r for r in range(1, R - delay * P + 1) if (r - 1) % P == p]
        for key in keys:
            expected = take(theta0, key) - sum(result.averages[r - 1][key] for r in applied)
            torch.testing.assert_close(take(result.global_params, key), expected, rtol=0, atol=1e-6)
    for m in range(cfg.num_clients):  # every worker restarts the last synced fragment from θ
        for key in fragments[(R - 1) % P]:
            assert torch.equal(take(result.worker_local_params[m], key), take(result.global_params, key))


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
    fragments_ = fragment_names(_shapes_of(theta0), P, cfg.fragment_pattern)
    for m in range(M):
        for p, keys in enumerate(fragments_):
            rounds_p = [r for r in range(1, R + 1) if (r - 1) % P == p]
            for key in keys:
                total = sum(result.averages[r - 1][key] for r in rounds_p if r <= R - delay * P)
                total = total + sum(result.outer_gradients[r - 1][m][key] / M
                                    for r in rounds_p if r > R - delay * P)
                moved = take(result.worker_outer_params[m], key) - take(theta0, key)
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
    fragments = fragment_names(_shapes_of(snapshots[1]), P, cfg.fragment_pattern)
    for p, keys in enumerate(fragments):
        last_sync = max(r for r in range(1, R + 1) if (r - 1) % P == p) * S
        for key in keys:
            torch.testing.assert_close(take(result.global_params, key), take(snapshots[last_sync], key),
                                       rtol=0, atol=1e-6)
            assert not torch.equal(take(snapshots[last_sync], key), take(snapshots[last_sync + 1], key))


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
    fragments = fragment_names(_shapes_of(start), P, cfg.fragment_pattern)
    snapshots = {}
    for step in range(1, R * S + tau + 1):
        replay.train_step()
        if step % S == 0:
            snapshots[step + tau] = (fragments[(step // S - 1) % P], replay.parameters_fp32())
        if step in snapshots:
            names, snapshot = snapshots.pop(step)
            params = replay.parameters_fp32()
            for key in names:
                take(params, key).mul_(mixing).add_(take(snapshot, key), alpha=1 - mixing)
            replay.load_parameters(params)
    assert_same_trajectory(result.worker_local_params[0], replay.parameters_fp32(), start)
