"""Held-out evaluation of a set of parameters: mean token cross-entropy and perplexity."""

from __future__ import annotations

import math

import numpy as np
import torch

from fl_diloco.model import Transformer


@torch.no_grad()
def evaluate(model: Transformer, sequences: np.ndarray, batch_size: int, device: str) -> dict[str, float]:
    """Loss over every token of `sequences` ([N, seq_len+1]); no sampling, so it is exact
    and identical from run to run."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = torch.as_tensor(sequences[start:start + batch_size], dtype=torch.long, device=device)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        tokens = batch[:, 1:].numel()
        total += loss.item() * tokens
        count += tokens
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
