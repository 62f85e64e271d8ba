"""How many workers of which preset fit on one GPU? Device memory per worker, from arithmetic.

Measured here (on the CPU, under the same bf16 autocast a CUDA worker uses): the bytes of
the tensors autograd keeps for the backward pass, per token, with saved-tensor hooks, for
1- and 2-layer versions of each preset at two batch sizes. That separates
    per block and token     (about 58 · d_model bytes: the block's bf16 activations, fp32 norms, RoPE)
    outside the blocks, per token   (about 4.2 · vocab bytes: the logits and their fp32 softmax)
    per block, fixed        (autocast's bf16 copy of the block's weights: 2 bytes per weight)
A CUDA flash-attention kernel keeps about what PyTorch's CPU kernel keeps (q, k, v, the
output and a log-sum-exp per row), never the T × T scores.

Then, per worker (one process, one CUDA context), in bytes, N = parameters (the fixed parts
are fl_diloco/memory.py's, the estimate the start-up check refuses runs with):
    fp32 weights 4N + fp32 gradients 4N + AdamW moments 8N + bf16 weight copies 2N
    + activations: micro_batch_size · seq_len · (per block and token · L + outside per token)
    + the loss's backward: about 6 · vocab bytes per token (fp32 and bf16 logit gradients)
    + 1 GiB for the CUDA context and the allocator's slack.
The outer state (θ and the Nesterov buffer, 8N) lives in host memory, not on the device.

It prints, for 24, 40 and 80 GB devices (GiB as nvidia-smi shows them), how many workers of
each paper preset fit at sequence length 2048 with micro_batch_size 1, 2 and 4. About a
minute on a CPU. The LAST line of stdout is one JSON object.

Usage:
    python bench/worker_memory.py [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fl_diloco import memory  # noqa: E402
from fl_diloco.model import ModelConfig, Transformer, count_parameters, model_config  # noqa: E402

# The fixed parts of the estimate are fl_diloco.memory's, which the start-up check uses too.
GIB = memory.GIB
CONTEXT_BYTES = memory.CUDA_CONTEXT_BYTES
STATE_BYTES_PER_PARAM = memory.TRAINING_STATE_BYTES_PER_PARAM + memory.AUTOCAST_COPY_BYTES_PER_PARAM
LOSS_BACKWARD_BYTES_PER_LOGIT = memory.LOSS_BACKWARD_BYTES_PER_LOGIT["bf16"]
DEVICES_GB = (24, 40, 80)
PAPER_PRESETS = ("35m", "100m", "200m", "300m", "500m", "1b")
PROBE_TOKENS = 128  # tokens per sequence in the measurement (the bytes per token do not depend on it)


def saved_bytes(cfg: ModelConfig, batch: int) -> int:
    """Bytes autograd keeps for the backward pass of one bf16-autocast forward, parameters excluded."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, tokens)
    return sum(kept.values())


def activation_profile(preset: str) -> dict[str, float]:
    """Per block and token, outside the blocks per token, and per block fixed (bytes)."""
    base = model_config(preset, seq_len=PROBE_TOKENS)
    s = {(layers, batch): saved_bytes(dataclasses.replace(base, n_layers=layers), batch)
         for layers in (1, 2) for batch in (1, 2)}
    block_token = ((s[2, 2] - s[1, 2]) - (s[2, 1] - s[1, 1])) / PROBE_TOKENS
    return {"block_token": block_token,
            "outside_token": (s[1, 2] - s[1, 1]) / PROBE_TOKENS - block_token,
            "block_fixed": (s[2, 1] - s[1, 1]) - block_token * PROBE_TOKENS}


def worker_bytes(cfg: ModelConfig, profile: dict[str, float], micro_tokens: int) -> float:
    """Device bytes of one worker training `micro_tokens` tokens per forward/backward."""
    per_token = (profile["block_token"] * cfg.n_layers + profile["outside_token"]
                 + LOSS_BACKWARD_BYTES_PER_LOGIT * cfg.vocab_size)
    return STATE_BYTES_PER_PARAM * count_parameters(cfg) + micro_tokens * per_token + CONTEXT_BYTES


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"workers per GPU at seq_len {args.seq_len} (bf16 autocast, AdamW, one process each)")
    print(f"  {'preset':>6}  {'params':>8}  {'B/token/block':>13}  {'mbs':>3}  {'GiB/worker':>10}  "
          + "  ".join(f"{gb:>3} GB" for gb in DEVICES_GB))
    for preset in PAPER_PRESETS:
        profile = activation_profile(preset)
        cfg = model_config(preset, seq_len=args.seq_len)
        for micro_batch in (1, 2, 4):
            need = worker_bytes(cfg, profile, micro_batch * args.seq_len)
            fit = {gb: int(gb * GIB // need) for gb in DEVICES_GB}
            rows.append({"preset": preset, "params": count_parameters(cfg), "micro_batch_size": micro_batch,
                         "gib_per_worker": need / GIB, **profile, "workers": fit})
            print(f"  {preset:>6}  {count_parameters(cfg) / 1e6:>7.0f}M  {profile['block_token']:>13.0f}  "
                  f"{micro_batch:>3}  {need / GIB:>10.1f}  " + "  ".join(f"{fit[gb]:>6}" for gb in DEVICES_GB),
                  flush=True)
    result = {"seq_len": args.seq_len, "rows": rows}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
