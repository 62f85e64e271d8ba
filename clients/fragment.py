"""One fragment of a worker's model and the outer state that belongs to it.

A fragment (the whole model unless streaming) owns, on the worker (under fsdp: on every rank of
the site, for the rows of its parameters that rank holds, clients/site.py):
  - its outer parameters θ_p and their Nesterov buffer: the worker's replica of the global
    ones for `diloco` and `delayed` (all workers keep identical replicas, because they apply
    the identical quantized averages the server applies), its OWN θ_{m,p} for `eager`;
  - the outer gradients it sent that the eager rule will still subtract, keyed by round.
The local parameters (what the inner optimizer trains) stay in the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from strategies.fragments import parse_key, select
from strategies.outer_optimizer import (OuterOptimizer, Tensors, eager_outer_gradient, outer_gradient,
                                        zeros_like)

# The local parameters: the model's own, or named tensors (under fsdp a rank's slices of them).
LocalParams = torch.nn.Module | Mapping[str, torch.Tensor]


def _named(params: LocalParams) -> Mapping[str, torch.Tensor]:
    return dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else params


def parameter_names(keys: list[str]) -> list[str]:
    """The parameters a fragment's keys lie in (a key may be some rows of one), in order."""
    return list(dict.fromkeys(parse_key(key)[0] for key in keys))


class Fragment:
    def __init__(self, index: int, keys: list[str], initial_params: Mapping[str, torch.Tensor],
                 outer_lr: float, outer_momentum: float) -> None:
        self.index = index
        self.keys = list(keys)  # parameter names or row ranges (strategies/fragments.py)
        self.outer = OuterOptimizer({k: torch.as_tensor(t).float().clone()
                                     for k, t in select(initial_params, keys).items()},
                                    outer_lr, outer_momentum)
        self.sent: dict[int, Tensors] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.outer.params.items()}

    def local_params(self, model: LocalParams) -> Tensors:
        return {k: t.detach().float().cpu() for k, t in select(_named(model), self.keys).items()}

    def outer_gradient(self, model: LocalParams) -> Tensors:
        """Δ_{m,p} = θ_p − θ_{m,p,local}: start minus end of the fragment's local progress."""
        return outer_gradient(self.outer.params, self.local_params(model))

    @torch.no_grad()
    def apply(self, update: Mapping[str, torch.Tensor], model: LocalParams, mixing: float = 0.0) -> None:
        """θ_p ← Outer_p(θ_p, update), then merge the local copy: local ← α·local + (1 − α)·θ_p.

        α = 0 (every variant's default) restarts the local copy from θ_p.
        """
        self.outer.step(update)
        for key, local in select(_named(model), self.keys).items():
            target = self.outer.params[key].to(local.device, local.dtype)
            if mixing == 0.0:
                local.copy_(target)
            else:
                # Two products and a sum, as the formula reads: an in-place add_ with alpha may
                # fuse into one multiply-add and round differently from one CPU to another.
                local.copy_(mixing * local + (1.0 - mixing) * target)

    def eager_step(self, server_round: int, stale_round: int, sent: Tensors, stale_average: Tensors,
                   counted: bool, weight: float, model: LocalParams) -> None:
        """The delayed/eager step at round r's sync: apply Δ̃(r) built from the stale average
        Δ(k), k = r − d·P, and keep Δ_m(r) (as the server decoded it) to take out of Δ(r)."""
        stale_own = self.sent.pop(stale_round, None)
        if not counted or stale_own is None:
            stale_own = zeros_like(sent)  # never added to the average: nothing to take out
        self.sent[server_round] = sent
        self.apply(eager_outer_gradient(stale_average, sent, stale_own, weight), model)
