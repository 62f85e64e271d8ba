"""A decoder-only, Llama-style transformer language model, in one file.

Read top to bottom:

    ModelConfig      -- the shape of the network (validated on construction)
    PRESETS          -- named shapes: two tiny CPU-friendly ones and the DiLoCo papers' sizes
    model_config()   -- preset name (+ optional vocab / context overrides) -> ModelConfig
    RMSNorm          -- root-mean-square layer norm, computed in fp32
    rotary_tables()  -- cos/sin tables for rotary position embeddings (RoPE)
    apply_rotary()   -- rotate query/key vectors by their position
    Attention        -- causal multi-head self-attention (PyTorch's fused SDPA kernel)
    MLP              -- SwiGLU feed-forward
    Block            -- pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))
    Transformer      -- embed -> blocks -> norm -> head, plus the loss
    num_parameters(), count_parameters()

Parameter naming matters to the rest of the project: streaming DiLoCo synchronises
the model in fragments made of whole blocks, so every parameter of block ``i`` lives
under the state_dict prefix ``blocks.{i}.``. Everything else (``embed``, the final
``norm`` and ``head``) is a "non-block" parameter; see ``strategies/fragments.py``.

No biases anywhere, as in Llama: they add parameters that do not help at this scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer. Frozen so a config can be shared and hashed safely."""

    vocab_size: int
    seq_len: int  # maximum context length; sizes the rotary tables
    n_layers: int
    n_heads: int
    d_model: int
    ffn_hidden: int  # hidden width of the SwiGLU MLP
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share one matrix between `embed` and `head`

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layers", "n_heads", "d_model", "ffn_hidden"):
            value = getattr(self, name)
            # bool is a subclass of int; True as a layer count is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {value}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}"
            )
        if self.head_dim % 2 != 0:
            # RoPE rotates coordinates in pairs, so each head needs an even width.
            raise ValueError(
                f"ModelConfig head_dim = d_model/n_heads = {self.head_dim} must be even "
                f"(d_model={self.d_model}, n_heads={self.n_heads})"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _ffn_hidden(d_model: int) -> int:
    """Llama's SwiGLU width: 2/3 of the usual 4*d (three matrices instead of two keep the
    parameter count equal), rounded up to a multiple of 64 so matmuls tile well."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


# Named shapes. Each entry holds ModelConfig keyword arguments; `model_config` may
# override vocab_size and seq_len.
#
# Actual parameter counts (count_parameters, default vocab):
#
#   preset    vocab  layers heads d_model  ffn  tied        params
#   tiny-1m    4096     2     4    128    384   no      1,475,200  (0.95M if tied)
#   tiny-10m   4096     6     5    320    896   no     10,244,160  (8.93M if tied)
#   35m       32000     6     8    512   1408   yes    35,658,240  (52.0M untied)
#   100m      32000     9    12    768   2048   yes    88,291,584  (112.9M untied)
#   200m      32000    12    16   1024   2752   yes   184,574,976  (217.3M untied)
#   300m      32000    15    20   1280   3456   yes   338,369,280  (379.3M untied)
#   500m      32000    18    24   1536   4096   yes   558,816,768  (608.0M untied)
#   1b        32000    24    32   2048   5504   yes 1,279,887,360  (1.35B untied)
#
# The paper shapes (layers/heads from the DiLoCo scaling-law and streaming DiLoCo
# papers, d_model = 64 * heads) land on their names only when the 32000 x d_model
# embedding is counted once, so they tie embed/head. The tiny presets keep separate
# matrices (the ModelConfig default). NOTE for tied models: the one matrix appears in
# state_dict twice (embed.weight and head.weight); update weights through
# named_parameters(), which lists it once, or a state_dict loop will apply a delta twice.
# load_state_dict accepts either form (see _fill_tied_head).
_TINY_VOCAB = 4096  # our tokenizer's default vocabulary
_PAPER_VOCAB = 32000


def _paper(n_layers: int, n_heads: int) -> dict[str, Any]:
    d_model = 64 * n_heads
    return dict(
        vocab_size=_PAPER_VOCAB,
        seq_len=2048,
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        ffn_hidden=_ffn_hidden(d_model),
        tie_embeddings=True,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny-1m": dict(
        vocab_size=_TINY_VOCAB, seq_len=256, n_layers=2, n_heads=4, d_model=128,
        ffn_hidden=_ffn_hidden(128),
    ),
    "tiny-10m": dict(
        vocab_size=_TINY_VOCAB, seq_len=256, n_layers=6, n_heads=5, d_model=320,
        ffn_hidden=_ffn_hidden(320),
    ),
    "35m": _paper(n_layers=6, n_heads=8),
    "100m": _paper(n_layers=9, n_heads=12),
    "200m": _paper(n_layers=12, n_heads=16),
    "300m": _paper(n_layers=15, n_heads=20),
    "500m": _paper(n_layers=18, n_heads=24),
    "1b": _paper(n_layers=24, n_heads=32),
}


def model_config(
    preset: str, vocab_size: int | None = None, seq_len: int | None = None
) -> ModelConfig:
    """Build the ModelConfig for a named preset.

    vocab_size / seq_len replace the preset's defaults when given (tiny presets default
    to our tokenizer's 4096 tokens, paper presets to 32000). Raises ValueError for an
    unknown preset name or an override that makes the config invalid.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}"
        )
    kwargs = dict(PRESETS[preset])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    return ModelConfig(**kwargs)


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    Computed in fp32 whatever the input dtype: the mean of squares over thousands of
    bf16 values loses too much precision, and norms are cheap.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rotary_tables(
    head_dim: int, seq_len: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq_len, head_dim // 2] (fp32).

    Coordinate pair k of a head is rotated at position p by angle p * theta^(-2k/head_dim):
    low pairs spin fast (fine position), high pairs slowly (coarse position).
    """
    # Angles in fp64 (on CPU, where fp64 is always available): in fp32, position * freq
    # is off by up to ~5e-4 rad at 8k positions, enough to blur relative offsets.
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return (
        angles.cos().to(device=device, dtype=torch.float32),
        angles.sin().to(device=device, dtype=torch.float32),
    )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim] by position; cos/sin are [T, head_dim // 2].

    Pairs are (x[i], x[i + head_dim/2]) -- the "split halves" layout. Because rotating
    q by angle a and k by angle b leaves q.k depending only on b - a, attention scores
    depend on relative position only.
    """
    half = x.shape[-1] // 2
    # Rotate in at least fp32: in bf16 the angle error at long positions becomes visible.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # output projection

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, C] -> [B, heads, T, head_dim], the layout SDPA expects.
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # The fused kernel (flash / memory-efficient on CUDA) never materialises the
        # T x T score matrix; is_causal masks future positions.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The gate lets each hidden unit switch itself off,
    which trains better than a plain GELU MLP of the same parameter count."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)  # down (output projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block. Normalising the branch input (not the residual stream)
    keeps an identity path from input to output, which is what makes deep stacks train."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return x


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def _fill_tied_head(module, state_dict, prefix, *args) -> None:
    """Let a tied model load weights that name the shared matrix once.

    named_parameters() lists a tied matrix only as ``embed.weight``, and the rest of the
    project moves weights around as such dicts; without this, load_state_dict(strict=True)
    would reject them for a missing ``head.weight``.
    """
    embed_key, head_key = prefix + "embed.weight", prefix + "head.weight"
    if embed_key in state_dict and head_key not in state_dict:
        state_dict[head_key] = state_dict[embed_key]


class Transformer(nn.Module):
    """Decoder-only language model: embed -> blocks -> norm -> head.

    Attributes: ``embed`` (nn.Embedding), ``blocks`` (nn.ModuleList; ``blocks[i]`` is
    block i), ``norm`` (final RMSNorm), ``head`` (nn.Linear to vocab logits; the same
    Parameter as ``embed.weight`` when ``cfg.tie_embeddings``).

    ``forward(idx, targets=None)`` returns ``(logits [B, T, V], loss or None)``; loss is
    the mean cross-entropy over positions whose target is not -100.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
            self.register_load_state_dict_pre_hook(_fill_tied_head)

        # Buffers follow .to(device) like parameters; non-persistent keeps them out of
        # state_dict, so checkpoints and DiLoCo sync only carry learned weights.
        cos, sin = rotary_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init. Each block adds two branch outputs (attention, MLP) to the
        residual stream, so their output projections are shrunk by 1/sqrt(2 * n_layers)
        to keep the stream's variance roughly independent of depth."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.wo.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.w2.weight, mean=0.0, std=out_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(
                f"sequence length {T} exceeds the model's seq_len={self.cfg.seq_len}"
            )
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))

        loss = None
        if targets is not None:
            # Softmax over a large vocabulary in bf16 is noticeably off; do it in fp32.
            loss = F.cross_entropy(
                logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss


# --------------------------------------------------------------------------------------
# Parameter accounting
# --------------------------------------------------------------------------------------


def num_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (a tied embed/head matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of ``Transformer(cfg)`` computed from the shapes alone, so the
    1b preset can be sized without allocating it. Must agree with num_parameters."""
    d, h, V = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size
    attention = 4 * d * d  # wq, wk, wv, wo
    mlp = 3 * d * h  # w1, w3, w2
    norms = 2 * d  # attn_norm, mlp_norm
    per_block = attention + mlp + norms
    embed = V * d
    head = 0 if cfg.tie_embeddings else V * d
    final_norm = d
    return embed + cfg.n_layers * per_block + final_norm + head


@torch.no_grad()
def load_parameters(model: nn.Module, params: Mapping[str, Any]) -> None:
    """Copy named tensors (torch or numpy, e.g. from the wire) into `model` in place.

    Keyed by `named_parameters()`, so a shared embedding/head matrix is written once, and a
    missing name is a KeyError rather than a silently stale weight.
    """
    for name, param in model.named_parameters():
        param.copy_(torch.as_tensor(params[name], dtype=param.dtype).to(param.device))
