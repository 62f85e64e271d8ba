"""Tests for fl_diloco.model: shapes, causality, RoPE, norms, parameter accounting,
presets, validation and a short overfit run. Small shapes keep the file fast on CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fl_diloco.model import (
    PRESETS,
    ModelConfig,
    RMSNorm,
    Transformer,
    apply_rotary,
    count_parameters,
    model_config,
    num_parameters,
    rotary_tables,
)


def small_config(**overrides) -> ModelConfig:
    kwargs = dict(vocab_size=97, seq_len=32, n_layers=2, n_heads=4, d_model=32, ffn_hidden=96)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def make_model(cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg or small_config())


# ---------------------------------------------------------------- forward pass


def test_output_shapes_and_loss():
    cfg = small_config()
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, cfg.vocab_size)
    assert loss is None
    logits, loss = model(idx, idx)
    assert loss is not None and loss.shape == ()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("tie", [False, True])
def test_initial_loss_close_to_uniform(tie):
    # Small init => near-uniform predictions => cross-entropy ~ ln(V).
    cfg = small_config(vocab_size=512, d_model=64, tie_embeddings=tie)
    model = make_model(cfg)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (4, 32), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (4, 32), generator=g)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3


def test_loss_is_mean_cross_entropy_and_ignores_minus_100():
    cfg = small_config()
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    targets = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    masked = targets.clone()
    masked[:, :4] = -100
    _, loss_masked = model(idx, masked)
    expected_masked = torch.nn.functional.cross_entropy(
        logits[:, 4:].reshape(-1, cfg.vocab_size), targets[:, 4:].reshape(-1)
    )
    torch.testing.assert_close(loss_masked, expected_masked)


def test_sequence_longer_than_seq_len_raises():
    cfg = small_config(seq_len=8)
    model = make_model(cfg)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_causality():
    cfg = small_config()
    model = make_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    t = 10
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, cfg.vocab_size, (2, 24 - t - 1), generator=g)
    assert not torch.equal(changed, idx)
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    # ...and the future positions do see the change (so the test is not vacuous).
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-3)


def test_deterministic_given_seed():
    cfg = small_config()
    a, b, c = make_model(cfg, seed=5), make_model(cfg, seed=5), make_model(cfg, seed=6)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_init_scales_output_projections():
    cfg = small_config(n_layers=8, d_model=128, ffn_hidden=384)
    model = make_model(cfg)
    expected_out = 0.02 / math.sqrt(2 * cfg.n_layers)
    block = model.blocks[3]
    assert block.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.w1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.attn.wo.weight.std().item() == pytest.approx(expected_out, rel=0.1)
    assert block.mlp.w2.weight.std().item() == pytest.approx(expected_out, rel=0.1)
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.d_model))


def test_no_biases():
    model = make_model()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


# ---------------------------------------------------------------- components


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 4 + 1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # bf16 input: computed in fp32, returned in the input dtype.
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, seq_len = 16, 64
    cos, sin = rotary_tables(head_dim, seq_len, theta=10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    # The same q (and k) vector placed at every position, rotated by its position.
    q_rot = apply_rotary(q.expand(seq_len, head_dim), cos.double(), sin.double())
    k_rot = apply_rotary(k.expand(seq_len, head_dim), cos.double(), sin.double())
    scores = q_rot @ k_rot.T  # scores[i, j] = q at position i . k at position j
    for i, j, s in [(0, 0, 7), (5, 2, 11), (3, 9, 20), (40, 1, 23)]:
        # Tables are fp32, so equality holds to fp32 rounding of cos/sin.
        assert scores[i, j].item() == pytest.approx(scores[i + s, j + s].item(), rel=1e-6, abs=1e-6)
    # Rotation preserves norms and actually changes the scores with the offset.
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(seq_len))
    assert abs(scores[0, 0].item() - scores[0, 5].item()) > 1e-3


def test_rotary_position_zero_is_identity():
    cos, sin = rotary_tables(8, 4)
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(apply_rotary(x, cos, sin)[:, 0], x[:, 0])


def test_rope_buffers_not_in_state_dict_and_follow_to():
    model = make_model()
    keys = set(model.state_dict())
    assert not any("rope" in k for k in keys)
    model = model.to(torch.float64)
    assert model.rope_cos.dtype == torch.float64
    logits, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    assert logits.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    cfg = small_config()
    model = make_model(cfg).cuda()
    assert model.rope_cos.is_cuda
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.is_cuda and torch.isfinite(loss)
    cpu_logits, _ = model.float().cpu()(idx.cpu())
    with torch.no_grad():
        gpu_logits, _ = model.cuda()(idx)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits.detach(), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- parameter accounting


@pytest.mark.parametrize("preset", ["tiny-1m", "tiny-10m"])
def test_count_parameters_matches_model_for_tiny_presets(preset):
    cfg = model_config(preset)
    assert count_parameters(cfg) == num_parameters(Transformer(cfg))


@pytest.mark.parametrize("tie", [False, True])
def test_count_parameters_matches_model_tied_and_untied(tie):
    cfg = small_config(tie_embeddings=tie)
    model = make_model(cfg)
    assert count_parameters(cfg) == num_parameters(model)
    assert (model.head.weight is model.embed.weight) == tie


def test_tied_embeddings_share_storage():
    cfg = small_config(tie_embeddings=True)
    model = make_model(cfg)
    untied = make_model(dataclasses.replace(cfg, tie_embeddings=False))
    assert num_parameters(untied) - num_parameters(model) == cfg.vocab_size * cfg.d_model
    # One Parameter, listed once by named_parameters (state_dict lists both names).
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and "head.weight" not in names
    assert {"embed.weight", "head.weight"} <= set(model.state_dict())


def test_tied_model_loads_named_parameters_dict():
    # Weights travel as {name: tensor} from named_parameters(), where a tied matrix
    # appears once; a strict load must still accept them.
    cfg = small_config(tie_embeddings=True)
    src, dst = make_model(cfg, seed=1), make_model(cfg, seed=2)
    params = {n: p.detach().clone() for n, p in src.named_parameters()}
    assert "head.weight" not in params
    dst.load_state_dict(params)  # strict
    assert dst.head.weight is dst.embed.weight
    torch.testing.assert_close(dst.head.weight, src.embed.weight)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    torch.testing.assert_close(dst(idx)[0], src(idx)[0])
    dst.load_state_dict(src.state_dict())  # both names present also works


def test_tiny_preset_sizes():
    assert 0.5e6 <= count_parameters(model_config("tiny-1m")) <= 2e6
    assert 5e6 <= count_parameters(model_config("tiny-10m")) <= 15e6


@pytest.mark.parametrize(
    "preset,nominal",
    [("35m", 35e6), ("100m", 100e6), ("200m", 200e6), ("300m", 300e6), ("500m", 500e6), ("1b", 1e9)],
)
def test_paper_preset_sizes_near_their_names(preset, nominal):
    cfg = model_config(preset)
    assert cfg.vocab_size == 32000
    n = count_parameters(cfg)
    assert nominal / 1.5 <= n <= nominal * 1.5, f"{preset}: {n:,}"


def test_paper_preset_shapes():
    shapes = {"35m": (6, 8), "100m": (9, 12), "200m": (12, 16), "300m": (15, 20), "500m": (18, 24), "1b": (24, 32)}
    for name, (layers, heads) in shapes.items():
        cfg = model_config(name)
        assert (cfg.n_layers, cfg.n_heads) == (layers, heads)
        assert cfg.ffn_hidden % 64 == 0
        assert cfg.ffn_hidden >= 8 * cfg.d_model / 3


def test_preset_sizes_ordered():
    counts = [count_parameters(model_config(name)) for name in PRESETS]
    assert counts == sorted(counts)


def test_preset_overrides():
    cfg = model_config("tiny-1m", vocab_size=1000, seq_len=64)
    assert (cfg.vocab_size, cfg.seq_len) == (1000, 64)
    assert model_config("tiny-1m").vocab_size == 4096
    assert model_config("35m", vocab_size=4096).vocab_size == 4096
    # Overriding must not mutate the shared preset table.
    assert PRESETS["tiny-1m"]["vocab_size"] == 4096


def test_parameter_names_follow_the_block_contract_fragments_rely_on():
    from strategies.fragments import block_index

    cfg = small_config(n_layers=3)
    model = make_model(cfg)
    for i, block in enumerate(model.blocks):
        assert {block_index(f"blocks.{i}.{n}") for n, _ in block.named_parameters()} == {i}
    non_block = {n for n in model.state_dict() if block_index(n) is None}
    assert non_block == {"embed.weight", "norm.weight", "head.weight"}
    assert all(n.startswith("blocks.") for n in model.state_dict() if n not in non_block)


# ---------------------------------------------------------------- validation


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError) as err:
        model_config("foo")
    msg = str(err.value)
    assert "'foo'" in msg
    for name in PRESETS:
        assert name in msg


@pytest.mark.parametrize(
    "overrides,field,value",
    [
        (dict(d_model=30, n_heads=4), "d_model", "30"),
        (dict(d_model=36, n_heads=4), "head_dim", "9"),
        (dict(n_layers=0), "n_layers", "0"),
        (dict(vocab_size=-3), "vocab_size", "-3"),
        (dict(ffn_hidden=0), "ffn_hidden", "0"),
        (dict(seq_len=0), "seq_len", "0"),
        (dict(norm_eps=0.0), "norm_eps", "0.0"),
    ],
)
def test_invalid_config_raises_with_field_and_value(overrides, field, value):
    with pytest.raises(ValueError) as err:
        small_config(**overrides)
    assert field in str(err.value) and value in str(err.value)


def test_invalid_override_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        model_config("tiny-1m", vocab_size=0)


# ---------------------------------------------------------------- training sanity


def test_adamw_overfits_fixed_batch():
    cfg = small_config(vocab_size=64)
    model = make_model(cfg)
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, cfg.vocab_size, (4, 17), generator=g)
    idx, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
