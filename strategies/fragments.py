"""Streaming DiLoCo's fragments and the schedule of Flower rounds.

See docs/algorithms.md#streaming-diloco and #rounds-and-schedule.

The model is split into P fragments; fragment p is synchronised once every H inner steps,
the fragments staggered H/P steps apart, so there is one Flower round every H/P inner steps
and each round carries one fragment:

    round r = 1, 2, …      syncs fragment (r − 1) mod P      at inner step r·H/P

Transformer blocks stay whole and go to fragments by the paper's patterns (`fragment_blocks`).
The non-block parameters (token embedding, final norm, output head: 5 % of a 1B model, up to
71 % of a tiny one) are then poured, by rows, into the fragments with the fewest block
elements until all fragments are as level as whole rows allow (`fragment_names`), so every
round carries about 1/P of a full sync. A fragment's share of a tensor is a contiguous range
of its rows, named `name[start:stop]`; a share that is the whole tensor keeps the plain name,
so with P = 1 everything is one fragment of plain names synced every H steps: plain DiLoCo.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TypeVar

import numpy as np

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PIECE = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")

T = TypeVar("T")


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


def level_quotas(block_elements: Sequence[int], poured: int) -> list[Fraction]:
    """How many of `poured` elements each fragment takes so that the fragments end level.

    Water filling: the level W solves Σ_p max(0, W − b_p) = poured, and fragment p takes
    max(0, W − b_p). Fragments already above W (more block elements) take nothing. Exact
    (fractions), so that where a cut falls never depends on rounding.
    """
    ordered = sorted(block_elements)
    for k in range(1, len(ordered) + 1):  # the k lightest fragments take something
        level = Fraction(poured + sum(ordered[:k]), k)
        if k == len(ordered) or level <= ordered[k]:
            break
    return [max(Fraction(0), level - b) for b in block_elements]


def _nearest(boundaries: list[int], position: Fraction) -> int:
    """The boundary nearest `position`; the lower one on a tie."""
    above = bisect.bisect_left(boundaries, position)
    if above == len(boundaries):
        return boundaries[-1]
    if above == 0 or boundaries[above] - position < position - boundaries[above - 1]:
        return boundaries[above]
    return boundaries[above - 1]


def fragment_names(param_shapes: Mapping[str, Sequence[int]], num_fragments: int,
                   pattern: str) -> list[list[str]]:
    """The keys of each fragment, in the model's order; every row of every tensor in exactly one.

    Blocks go whole by `pattern`. The non-block tensors, in the model's order, are read as one
    stream of rows (dim 0; a 1-D tensor's rows are its elements); fragment 0 takes the stream's
    first `level_quotas` share, fragment 1 the next, and so on, each cut at the row boundary
    nearest its quota's end (the lower one on a tie). A key is a parameter name, or
    `name[start:stop]` for part of its rows.
    """
    shapes = {name: tuple(shape) for name, shape in param_shapes.items()}
    if num_fragments == 1:
        return [list(shapes)]
    blocks = {b for b in map(block_index, shapes) if b is not None}
    owner = {b: p for p, held in enumerate(fragment_blocks(len(blocks), num_fragments, pattern))
             for b in held}
    size = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    block_elements = [0] * num_fragments
    for name in shapes:
        if block_index(name) is not None:
            block_elements[owner[block_index(name)]] += size[name]

    # Row boundaries of the non-block stream, in elements from its start.
    rest = [name for name in shapes if block_index(name) is None]
    row_size = {name: size[name] // shapes[name][0] for name in rest}
    starts = [0]
    for name in rest:
        starts.append(starts[-1] + size[name])
    boundaries = [start + row_size[name] * row for start, name in zip(starts, rest)
                  for row in range(shapes[name][0])] + [starts[-1]]
    quotas = level_quotas(block_elements, starts[-1])
    cuts = [0] + [_nearest(boundaries, sum(quotas[:p + 1])) for p in range(num_fragments - 1)] + [starts[-1]]

    pieces: dict[str, list[tuple[int, str]]] = {}  # non-block name → (fragment, key)
    for p in range(num_fragments):
        for i, name in enumerate(rest):
            lo, hi = max(cuts[p], starts[i]), min(cuts[p + 1], starts[i + 1])
            if lo < hi:
                rows = ((lo - starts[i]) // row_size[name], (hi - starts[i]) // row_size[name])
                whole = rows == (0, shapes[name][0])
                pieces.setdefault(name, []).append((p, name if whole else f"{name}[{rows[0]}:{rows[1]}]"))

    fragments: list[list[str]] = [[] for _ in range(num_fragments)]
    for name in shapes:
        block = block_index(name)
        if block is not None:
            fragments[owner[block]].append(name)
        for p, key in pieces.get(name, []):
            fragments[p].append(key)
    return fragments


def parse_key(key: str) -> tuple[str, slice]:
    """A fragment key's parameter name and rows (all of them for a plain name)."""
    match = _PIECE.match(key)
    if match is None:
        return key, slice(None)
    return match["name"], slice(int(match["start"]), int(match["stop"]))


def select(tensors: Mapping[str, T], keys: Sequence[str]) -> dict[str, T]:
    """The tensors (torch or numpy) a fragment's keys name: row ranges are views, not copies,
    so writing into them in place writes the whole tensor."""
    return {key: tensors[name][rows] for key, (name, rows) in zip(keys, map(parse_key, keys))}


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
