"""Streaming DiLoCo's fragments and the schedule of Flower rounds.

See docs/algorithms.md#streaming-diloco and #rounds-and-schedule.

The model's transformer blocks are split into P fragments; fragment p is synchronised once
every H inner steps, the fragments staggered H/P steps apart, so there is one Flower round
every H/P inner steps and each round carries one fragment:

    round r = 1, 2, …      syncs fragment (r − 1) mod P      at inner step r·H/P

Parameters outside the blocks (token embedding, final norm, output head) live in the last
fragment, whose syncs fall on the multiples of H: with P = 1 everything is one fragment
synced every H steps, which is plain DiLoCo.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to, or None for embeddings, norm and head."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def fragment_blocks(num_blocks: int, num_fragments: int, pattern: str) -> list[list[int]]:
    """Which blocks each fragment holds.

    strided (the paper's choice): fragment p holds blocks p, p + P, p + 2P, …
    sequential: contiguous runs, the first ones one block longer when P does not divide L.
    """
    if not 1 <= num_fragments <= num_blocks:
        raise ValueError(f"fragments={num_fragments} must be between 1 and the model's "
                         f"{num_blocks} blocks")
    if pattern == "strided":
        return [list(range(p, num_blocks, num_fragments)) for p in range(num_fragments)]
    if pattern == "sequential":
        return [chunk.tolist() for chunk in np.array_split(np.arange(num_blocks), num_fragments)]
    raise ValueError(f"fragment_pattern='{pattern}' is not allowed; choose strided or sequential")


def fragment_names(param_names: Iterable[str], num_fragments: int, pattern: str) -> list[list[str]]:
    """The parameter names of each fragment, in the model's order; every name in exactly one."""
    names = list(param_names)
    blocks = {b for b in map(block_index, names) if b is not None}
    num_blocks = max(blocks) + 1 if blocks else 0
    if num_fragments == 1:
        return [names]
    owner = {b: p for p, held in enumerate(fragment_blocks(num_blocks, num_fragments, pattern))
             for b in held}
    fragments: list[list[str]] = [[] for _ in range(num_fragments)]
    for name in names:
        block = block_index(name)
        fragments[num_fragments - 1 if block is None else owner[block]].append(name)
    return fragments


def round_fragment(server_round: int, num_fragments: int) -> int:
    """The fragment Flower round `server_round` (1-based) synchronises."""
    return (server_round - 1) % num_fragments


def sync_step(server_round: int, sync_interval: int) -> int:
    """The inner step (counted from 1 over the whole run) at which round `server_round` syncs."""
    return server_round * sync_interval


def stale_round(server_round: int, staleness: int, num_fragments: int) -> int:
    """k = r − d·P: the round whose average `delayed`/`eager` apply at round r's sync.

    It synced the same fragment d syncs (d·H inner steps) earlier; k ≤ 0 means there was no
    such round yet, and Δ(k) = 0 (Δ(t) = 0 for t ≤ 0).
    """
    return server_round - staleness * num_fragments


def rounds_in_flight(staleness: int, num_fragments: int) -> int:
    """D: how many rounds the server keeps open at once; round r is sent once r − D is done.

    `diloco` needs round r's average before it goes on (τ < H/P), so rounds run one at a
    time. `delayed`/`eager` first need the average d·P rounds later, so the server can
    have d·P rounds open and a link as slow as d·H inner steps stays hidden.
    """
    return max(1, staleness * num_fragments)
