"""Model FLOPs per token, the peak FLOP/s of known accelerators, and MFU: defined here once.

Model FLOPs per trained token (forward + backward), the convention of the PaLM paper's MFU
(Chowdhery et al. 2022, appendix B) that nanoGPT and torchtitan report too:

    flops_per_token = 6 · N_matmul + 12 · L · T · d

- 6 · N_matmul: every weight that multiplies an activation costs 2 FLOPs per token in the
  forward pass (a multiply and an add) and 4 in the backward pass (the gradient with respect
  to its input and to itself). N_matmul counts the attention and MLP matrices and the output
  head; the embedding is a table lookup, not a matmul, so an untied embedding does not count
  (a tied one does, once, as the head). Norm weights are elementwise and negligible.
- 12 · L · T · d: attention's two sequence-length matmuls, QKᵀ and the weighted sum of V, each
  2 · T · d FLOPs per token and layer forward, times 3 for forward + backward. T is the
  training sequence length. The causal mask means a kernel does about half of this work; the
  convention counts it whole, so MFU figures compare with other codebases'.

Recomputation (activation checkpointing) is not counted: MFU measures useful work.

MFU = tokens/s · flops_per_token / peak FLOP/s, against the device's dense bf16 tensor-core
peak (also for fp32 runs, so that the figure says how much of the hardware a run uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fl_diloco.model imports torch; this module must not need it
    from fl_diloco.model import ModelConfig

TRAINING_FLOPS_PER_PARAM = 6  # 2 forward + 4 backward, per weight and token

# Dense (no sparsity) bf16 tensor-core peak of one GPU, from the vendors' datasheets, matched
# in order against torch.cuda.get_device_name(): specific names before the names they contain.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2.25e15),
    ("H200", 989e12),  # also GH200
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


def matmul_parameters(cfg: ModelConfig) -> int:
    """N_matmul: the parameters that multiply an activation (see the module docstring)."""
    from fl_diloco.model import count_parameters

    d = cfg.d_model
    norms = (2 * cfg.n_layers + 1) * d
    lookup_only = 0 if cfg.tie_embeddings else cfg.vocab_size * d  # an untied embedding
    return count_parameters(cfg) - norms - lookup_only


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs of one trained token at sequence length `seq_len` (forward + backward)."""
    attention = 12 * cfg.n_layers * seq_len * cfg.d_model
    return float(TRAINING_FLOPS_PER_PARAM * matmul_parameters(cfg) + attention)


@dataclass(frozen=True)
class PeakFlops:
    """One worker's peak FLOP/s, or None with the reason it is unknown."""

    flops: float | None
    source: str  # where the figure comes from, or why there is none


def device_peak_flops(device: str, override: float = 0.0) -> PeakFlops:
    """The peak bf16 FLOP/s of `device` ("cpu", "cuda", "cuda:1"): the `peak_flops` key when
    it is set, else the table above for a GPU it names."""
    if override > 0:
        return PeakFlops(override, "the peak_flops key")
    if not device.startswith("cuda"):
        return PeakFlops(None, "a CPU has no known peak FLOP/s; set peak_flops to get MFU")
    import torch

    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return PeakFlops(flops, f"{name} (fl_diloco/flops.py)")
    return PeakFlops(None, f"no peak FLOP/s known for {name}; set peak_flops to get MFU")


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the peak (None without a peak)."""
    if not peak_flops:
        return None
    return tokens_per_second * flops_per_token / peak_flops
