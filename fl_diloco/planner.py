"""Compute-utilization planner: which method and settings keep the accelerators busy?

Given a model (parameter count N and L transformer blocks, or a preset), a step time, M
workers, H inner steps, P streaming fragments, a wire precision and a link (bandwidth in
Gbit/s, latency in s), predict for each training method

    CU = compute time / wall time

and, inversely, the bandwidth needed to reach a target CU (50/80/90/95/99 %).

Read top to bottom:

    bits_per_value()          -- bits one value costs on the wire (fp4 block scales included)
    step_time_from_flops()    -- 6·N·tokens / (MFU · peak FLOP/s)
    step_time_from_run()      -- T as a run measured it (its summary.json)
    overhead_from_file()      -- O, the per-round overhead a deployment measured
    Workload                  -- the model, the run and the wire (validated on construction)
    workload_from_preset()    -- a Workload for fl_diloco.model.PRESETS[name]
    Method, parse_method()    -- "dp", "diloco", "streaming", "-inner<τ>", "-eager<d>"
    link_costs(), traffic_per_sync()  -- ring all-reduce vs Flower's star
    predict()                 -- CU and wall time at one bandwidth
    bandwidth_for_cu()        -- the inverse, by bisection
    plot_cu_vs_bandwidth()    -- PNG, CU against log bandwidth, one line per method
    main()                    -- `fl-diloco plan ...`: Markdown table + optional PNG

The model
=========

Units: bandwidth B in Gbit/s = 1e9 bit/s per worker per direction (links are full duplex);
a payload of n values at precision p is S = n · bits_per_value(p) bits. fp32 32, bf16 16,
fp8 8 bits (its one fp32 scale per tensor is negligible), fp4 4 bits plus one fp32 scale per
FP4_BLOCK_SIZE = 128 values (strategies/codecs.py), i.e. 4.25 bits.

Bytes per sync, each worker (one sync = one all-reduce of a payload of S bits):

(a) ring all-reduce between the sites (``topology="ring"``, bandwidth-optimal): reduce-scatter
    then all-gather; each worker sends and receives 2·(M−1)/M · S (both at once, the link is
    full duplex). Time: 2·(M−1)/M · S / B + 2·(M−1)·latency (2·(M−1) hops in sequence).
    M = 2 gives S/B + 2·latency; M = 1 needs no communication at all.
(b) Flower's star through the SuperLink (``topology="star"``): each worker uploads S and
    downloads S; the SuperLink's own link carries M·S each way. Flower forwards messages
    whole and broadcasts only after every upload has arrived, so upload and download do not
    overlap: time = 2 · max(S / B, M·S / B_server) + 2·latency, B_server defaulting to B.
    For the same reason a star sync cannot start before its whole payload is ready (no
    per-layer pipelining, see below).

``sync_hops()`` is the number of one-way delays a sync pays in sequence: 2·(M−1) around the
ring, 2 through the star (up, then down).

Fixed costs per sync. Whatever a sync costs regardless of bandwidth enters as latency. In a
Flower deployment that is mostly the framework itself: the SuperNode polls for messages, a
fresh ClientApp process starts for every message, the ServerApp polls for replies
(docs/algorithms.md#flower-constraints; about 3 to 4 s per round on an idle machine).
Measure it once per round (e.g. a `diloco` worker's idle seconds per round on an unshaped
link) and pass

    latency_s = one-way link delay + per-round overhead / sync_hops(workload)

(``fl-diloco plan --sync-overhead O``, or ``--overhead-from FILE`` with the O a deployment
bench printed or a `diloco` run's summary.json: ``overhead_from_file``). A blocking method
pays it in full every sync; eager hides it as long as the whole sync (transfers plus
overhead) fits in its d·H steps of overlap. That is also what Flower does: with d·P rounds
in flight (strategies/fragments.py, one for `eager` d = 1, P = 1) the next round's request
goes out only when a round closes, so a sync's latency is not pipelined away behind the
next one, exactly as modelled below.
Not modelled: a Flower 1.41 SuperNode serves one message at a time (it pulls the next only
after pushing its reply to the last), so with d·P >= 2 rounds in flight a worker gets round
r's message only one node cycle (push, pull, ClientApp start) after its round r - 1 sync, and
eager also needs that cycle to fit in H/P steps (bench/deployment_overlap.py measures it).

Timeline inside one inner step of length T (the accelerator's view): the forward pass takes
1/3 of T and the backward pass 2/3 (6·N FLOPs per token = 2·N forward + 4·N backward), both
spread evenly over the L blocks. Block j (0 = nearest the input) therefore finishes its
backward at T·(1/3 + (L−j)·(2/3)/L) and is next needed by the forward pass at
T·(1 + j·(1/3)/L): the link has j/L·T of slack for block j, for free, because later blocks'
backward and earlier blocks' forward still have to run. Non-block parameters (embedding,
final norm, head; ``non_block_params``) are ready last and needed first: no slack. A ring
sync streams its payload block by block in readiness order over one FIFO link, as a
bucketed all-reduce does.

What each method sends and when its result is needed (τ_eff = steps of overlap):

    dp                  every step: all N gradients at ``grad_precision``; τ_eff = 0.
                        The gradient all-reduce overlaps the rest of the backward and the
                        next forward per block (the DAG slack above), like DDP buckets.
    diloco              every H steps: all N outer-gradient values; τ_eff = 0 (blocking).
    streaming           every H/P steps: one fragment (strided: blocks p, p+P, ...; rows of
                        the non-block parameters level the fragments to N/P each, as in
                        strategies/fragments.py); τ_eff = 0.
    <family>-inner<τ>   the average is applied τ inner steps later: τ_eff = τ (paper: τ = 1).
    <family>-eager<d>   eager updates with d outer steps of delay: the average is needed d·H
                        steps after the sync (per fragment for streaming), τ_eff = d·H.

A sync's exposed time is max(0, max over its blocks of (arrival − deadline)), arrival being
the FIFO link's finishing time for the block plus the latency and the deadline that block's
next forward pass τ_eff steps later. Per period (1 step for dp, H steps for the rest):

    compute = period·T
    exposed = sum of the syncs' exposed times           (compute waits for late averages)
    link    = sum of the syncs' transfer times          (the link can carry no more)
    wall    = max(compute + exposed, link)
    CU      = compute / wall ;   wall time for K steps = K·T / CU

So blocking methods pay each sync's transfer minus its DAG slack; τ-step overlap hides up to
τ·T more; eager hides up to d·H·T, which makes it link-throughput bound: different fragments'
syncs share the one link, so all the bytes of an outer step must cross it within H steps of
compute, and CU = min(1, B / B_full) with B_full = (bits per H steps) / (H·T). Syncs are
assumed not to queue behind each other except through that throughput bound (exact for
blocking and τ < H/P, where compute waits for each sync before the next one starts).
CU rises monotonically with B (every arrival time falls as B grows), so the inverse is a
bisection on log B; it returns inf when the target is out of reach (latency that no overlap
hides, or non-block parameters with zero slack and a target of exactly 100 %), and 0 when
even 1 bit/s suffices. With infinite bandwidth and zero latency every method reaches CU = 1.

Validation against the eager-updates paper's 1B table (docs/algorithms.md#compute-utilization)
==============================================================================

What the paper's simulation must assume was inferred from its numbers, then fixed once
(no constant differs between rows or cells):

* N = 1e9 (the nominal "1B"), L = 24 blocks of N/L each, T = 0.1 s, M = 2 over a ring
  (2·(M−1)/M = 1), latency 0 (bandwidth is the only limit), P = 8 (3 blocks per fragment).
* Data-parallel and unquantized Streaming DiLoCo send bf16 (16 bits per value): fp32 would
  double every figure of those rows, and the payload that fits each row best is 14.1 and
  15.3 bits. FP4 counts 4 bits per value (the τ = 1, H = 100 row implies 3.9), i.e. the
  paper's simulation ignores block scales; the planner's default adds ours (4.25 bits).
* The per-block DAG slack above. Without it blocking rows are far too steep (B99/B50 of
  ~99 instead of the paper's ~20 for streaming); with it, the data-parallel, Streaming
  DiLoCo and τ = 1, H = 100 rows land within 18 % of every cell (15 of 30 cells).
* The plateaus (4.3 4.3 4.3, 2.0 2.0 2.0, 0.2 0.2 0.2 0.2): 17 of the table's 21 distinct
  values are points of a log grid of 50 bandwidths from 0.1 to 1000 Gbit/s
  (np.logspace(-1, 3, 50), a factor 1.207 apart) to the printed precision. Each cell is the
  largest grid point at which CU is still below the target (fl_diloco/planner_paper.py
  reproduces the papers' simulation itself: `fl-diloco plan --mode paper`). When CU rises steeply, as for throughput-bound overlap (CU = B/B_full:
  80 % to 99 % is a factor 1.24, about one grid step) or once a transfer just fits under
  its overlap window, several targets fall between the same two grid points and report the
  same value. The flat rows are that knee, not a ceiling below 100 % (with latency 0 every
  method here reaches 100 %; latency that no overlap hides is what caps CU). The planner
  predicts the continuous threshold; the bench also shows it snapped to the grid.
* What does not match: the H = 30 rows (τ = 1 and eager) need 1.4 to 2.6 times the
  bandwidth this model predicts (τ = 1 also with a steeper curve), and the eager H = 100
  row about half. The paper's eager rows scale as ~1/H² (2.0 vs 0.2 Gbit/s, ×10 for H 100
  → 30) where any model in which every bit crosses the link once per outer step scales as
  1/H (×3.3); and 0.2 Gbit/s is less than the mean rate needed to move 4 Gbit of FP4 every
  10 s at all. We keep the physical bound rather than fit per-row constants; the bench
  prints each row's implied bits per value and shape error so the disagreement is explicit.

Known limits: steady state (the first and last syncs of a run are ignored); one link per
worker shared by all its traffic; compute per step is uniform; optimizer time is ignored;
bandwidth is goodput (a shaped link's framing costs a few % of its nominal rate); compute
slowed down by the communication's own CPU work (process start-up, serialisation) on the
same cores is not modelled: measure the step time where the run happens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fl_diloco.config import FRAGMENT_PATTERNS, MODEL_ALIASES
from fl_diloco.config import staleness as staleness_of
from fl_diloco.config import WIRE_PRECISIONS as PRECISIONS
from fl_diloco.flops import TRAINING_FLOPS_PER_PARAM
from fl_diloco.reporting import METRICS_NAME, format_bytes
from strategies.codecs import FP4_BLOCK_SIZE
from strategies.fragments import fragment_blocks, level_quotas

__all__ = [
    "CU_TARGETS",
    "FP4_BLOCK_SIZE",
    "METHODS",
    "Method",
    "Prediction",
    "Workload",
    "bandwidth_for_cu",
    "bits_per_value",
    "idle_per_worker_round",
    "link_costs",
    "main",
    "overhead_from_file",
    "parse_method",
    "plan_table",
    "plot_cu_vs_bandwidth",
    "predict",
    "startup_rounds",
    "steady_rows",
    "step_time_from_flops",
    "step_time_from_run",
    "sync_hops",
    "traffic_per_sync",
    "workload_from_preset",
]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

GBIT = 1e9  # bits per Gbit (network units are decimal)
FORWARD_SHARE = 1 / 3  # 6N FLOPs per token: 2N forward, 4N backward
_VALUE_BITS = {"fp32": 32, "bf16": 16, "fp8": 8, "fp4": 4}
FP4_SCALE_BITS = 32  # one float32 absmax per block
TOPOLOGIES = ("ring", "star")
PAPER_BLOCKS_PER_FRAGMENT = 3  # Streaming DiLoCo's fragments, at every scale
CU_TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)
METHODS = (
    "dp",
    "diloco",
    "diloco-inner1",
    "diloco-eager1",
    "diloco-eager2",
    "streaming",
    "streaming-inner1",
    "streaming-eager1",
    "streaming-eager2",
)
_BANDWIDTH_FLOOR_GBPS = 1e-9  # 1 bit/s: below this "any bandwidth will do"
_BANDWIDTH_CEILING_GBPS = 1e12  # beyond this a target counts as unreachable


def bits_per_value(precision: str, fp4_block_size: int = FP4_BLOCK_SIZE,
                   fp4_scale_bits: int = FP4_SCALE_BITS) -> float:
    """Bits one value costs on the wire, scale overhead included (fp4: 4 + 32/128 = 4.25)."""
    if precision not in _VALUE_BITS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp4":
        return _VALUE_BITS["fp4"] + fp4_scale_bits / fp4_block_size
    return float(_VALUE_BITS[precision])


def step_time_from_flops(params: float, tokens_per_step: float, mfu: float,
                         peak_flops: float) -> float:
    """Seconds per inner step: 6·N·tokens_per_step / (MFU · peak FLOP/s)."""
    _require(params > 0, "params", "must be > 0", params)
    _require(tokens_per_step > 0, "tokens_per_step", "must be > 0", tokens_per_step)
    _require(0 < mfu <= 1, "mfu", "must be in (0, 1]", mfu)
    _require(peak_flops > 0, "peak_flops", "must be > 0", peak_flops)
    return TRAINING_FLOPS_PER_PARAM * params * tokens_per_step / (mfu * peak_flops)


def step_time_from_run(run_dir: str) -> tuple[float, dict]:
    """T measured by a finished run, and the run's config: one worker's tokens per inner step
    (batch_size · seq_len) over the tokens/s a worker reached while computing (summary.json)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ValueError(f"--from-run: {path} does not exist; give the out_dir of a finished run")
    summary = json.loads(path.read_text())
    rate = summary.get("tokens_per_second_per_worker")
    if not rate:
        raise ValueError(f"--from-run: {path} has no tokens_per_second_per_worker (a run from an "
                         f"older fl-diloco); give --step-time instead")
    config = summary["config"]
    return config["batch_size"] * config["seq_len"] / rate, config


# --------------------------------------------------------------------------------------
# The per-round overhead a deployment measured
# --------------------------------------------------------------------------------------


def startup_rounds(staleness: int, fragments: int) -> int:
    """Flower rounds at the start of a deployed run that are not yet its steady state.

    Round 1 never waits; the next 1 + d·P wait for averages whose requests went out only
    after the ServerApp's start-up (it evaluates θ(0) and Flower starts the first ClientApps
    while the workers already train). Every later round is H/P steps plus one wait.
    """
    return 2 + staleness * fragments


def steady_rows(summary: dict, rows: list[dict]) -> list[dict]:
    """The metrics.jsonl rows of a run's steady rounds (`startup_rounds` left out)."""
    config = summary["config"]
    fragments = config["fragments"] if config.get("streaming") else 1
    skip = startup_rounds(staleness_of(summary["algorithm"], config["delay"]), fragments)
    return [row for row in rows if row.get("round", 0) > skip and row.get("clients")]


def idle_per_worker_round(rows: list[dict]) -> float:
    """Mean idle seconds of one worker in one of these rounds."""
    worker_rounds = [client["idle_seconds"] for row in rows for client in row["clients"]]
    return sum(worker_rounds) / max(1, len(worker_rounds))


def overhead_from_run(summary_path: Path, summary: dict) -> float:
    """O from a finished blocking run: its workers' mean idle seconds per steady round.

    On an unshaped link a blocking worker waits exactly the deployment's own overhead each
    round, so its idle time is O; an overlapping run's idle time is what overlap left of it.
    """
    config, variant = summary["config"], summary.get("variant", summary["algorithm"])
    if summary["algorithm"] != "diloco" or config.get("overlap_steps", 0):
        raise ValueError(f"--overhead-from: {summary_path} is a {variant} run; only a blocking "
                         f"diloco run waits out the whole overhead every round (overlap hides part "
                         f"of it), so give a diloco run's summary.json")
    metrics = summary_path.with_name(METRICS_NAME)
    if not metrics.is_file():
        raise ValueError(f"--overhead-from: {metrics} does not exist; the per-round overhead is "
                         f"read from the run's rounds, next to its {summary_path.name}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steady = steady_rows(summary, rows)
    if not steady:
        raise ValueError(f"--overhead-from: {metrics} has no round after the first "
                         f"{startup_rounds(0, 1)} (start-up); give a run of more rounds")
    return idle_per_worker_round(steady)


def overhead_from_file(path: str) -> tuple[float, str]:
    """The per-round overhead O (s) a file holds, and where it came from.

    The file is a deployment bench's output (its last line, a JSON object with
    `round_overhead_s`; the whole saved stdout also works) or a run's summary.json
    (`overhead_from_run`, from the metrics.jsonl beside it).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--overhead-from: {file} does not exist; give a deployment bench's "
                         f"saved output or a diloco run's summary.json")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    try:
        found = json.loads("\n".join(lines))  # a JSON file (summary.json) ...
    except json.JSONDecodeError:
        try:  # ... or a bench's stdout, whose last line is its figures
            found = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            found = None
    if not isinstance(found, dict):
        raise ValueError(f"--overhead-from: {file} holds no JSON object (nor ends with one); give "
                         f"a deployment bench's last output line or a run's summary.json")
    if "skipped" in found:
        raise ValueError(f"--overhead-from: {file} is a bench that skipped ({found['skipped']}); "
                         f"it measured nothing")
    if "round_overhead_s" in found:
        overhead = found["round_overhead_s"]
        source = f"{found.get('benchmark', 'bench')} output {file}"
    elif {"algorithm", "idle_seconds", "config"} <= found.keys():
        overhead = overhead_from_run(file, found)
        source = f"{found['algorithm']} run {file}"
    else:
        raise ValueError(f"--overhead-from: {file} has neither round_overhead_s (a deployment "
                         f"bench's output) nor a run summary's idle_seconds")
    if not (isinstance(overhead, (int, float)) and math.isfinite(overhead) and overhead >= 0):
        raise ValueError(f"--overhead-from: {file} gives a per-round overhead of {overhead!r}, "
                         f"not a number of seconds >= 0")
    return float(overhead), source


def _require(ok: bool, name: str, what: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {what}, got {value!r}")


# --------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One model on one setup. ``params`` counts every parameter once (tied matrices once)."""

    params: float  # N
    layers: int  # L transformer blocks
    step_time: float  # T, seconds of compute per inner step
    workers: int = 2  # M sites
    inner_steps: int = 100  # H
    fragments: int | None = None  # P (streaming); None: 3 blocks per fragment, at least 1.
    #                                H/P need not be an integer for the timing model
    precision: str = "fp32"  # outer gradients on the wire (DiLoCo family)
    grad_precision: str = "bf16"  # gradients on the wire (data-parallel)
    non_block_params: float = 0.0  # embedding, final norm, head: part of `params`
    fragment_pattern: str = "strided"
    topology: str = "ring"
    server_bandwidth_gbps: float | None = None  # star only; None = same as the workers'
    fp4_block_size: int = FP4_BLOCK_SIZE
    fp4_scale_bits: int = FP4_SCALE_BITS

    def __post_init__(self) -> None:
        if self.fragments is None and isinstance(self.layers, int) and self.layers >= 1:
            object.__setattr__(self, "fragments", max(1, self.layers // PAPER_BLOCKS_PER_FRAGMENT))
        for name in ("layers", "workers", "inner_steps", "fragments", "fp4_block_size",
                     "fp4_scale_bits"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool), name,
                     "must be an int", value)
            _require(value >= (0 if name == "fp4_scale_bits" else 1), name,
                     "must be >= 1" if name != "fp4_scale_bits" else "must be >= 0", value)
        for name in ("params", "step_time"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                     name, "must be a finite number > 0", value)
        _require(0 <= self.non_block_params < self.params, "non_block_params",
                 f"must be in [0, params={self.params:g})", self.non_block_params)
        _require(self.fragments <= self.layers, "fragments",
                 f"must be between 1 and layers={self.layers}", self.fragments)
        for name, allowed in (("precision", PRECISIONS), ("grad_precision", PRECISIONS),
                              ("fragment_pattern", FRAGMENT_PATTERNS),
                              ("topology", TOPOLOGIES)):
            value = getattr(self, name)
            _require(value in allowed, name, f"must be one of {', '.join(allowed)}", value)
        if self.server_bandwidth_gbps is not None:
            _require(self.server_bandwidth_gbps > 0, "server_bandwidth_gbps", "must be > 0",
                     self.server_bandwidth_gbps)

    @property
    def block_params(self) -> float:
        """Parameters of one transformer block."""
        return (self.params - self.non_block_params) / self.layers

    def replace(self, **changes: object) -> Workload:
        return dataclasses.replace(self, **changes)


def workload_from_preset(name: str, step_time: float, *, vocab_size: int | None = None,
                         seq_len: int | None = None, **kwargs: object) -> Workload:
    """A Workload for ``fl_diloco.model.PRESETS[name]``: exact N, L and non-block size.

    ``vocab_size``/``seq_len`` override the preset's, as a run's config does (the tiny
    presets are usually trained with the run's own tokenizer size).
    """
    # fl_diloco.model imports torch: only pay for it when a preset is asked for.
    from fl_diloco.model import count_parameters, model_config

    cfg = model_config(name, vocab_size=vocab_size, seq_len=seq_len)
    one, two = (count_parameters(dataclasses.replace(cfg, n_layers=n)) for n in (1, 2))
    params = count_parameters(cfg)
    non_block = params - cfg.n_layers * (two - one)
    return Workload(params=float(params), layers=cfg.n_layers, step_time=step_time,
                    non_block_params=float(non_block), **kwargs)


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------

_METHOD_RE = re.compile(r"^(dp|diloco|streaming)(?:-(inner|eager)(\d+))?$")


@dataclass(frozen=True)
class Method:
    family: str  # "dp" | "diloco" | "streaming"
    overlap: str = "none"  # "none" | "inner" (τ inner steps) | "eager" (d outer steps)
    steps: int = 0  # τ or d

    @property
    def name(self) -> str:
        if self.overlap == "none":
            return self.family
        return f"{self.family}-{self.overlap}{self.steps}"

    def overlap_steps(self, inner_steps: int) -> int:
        """τ_eff: inner steps between a sync and the forward pass that needs its result."""
        if self.overlap == "inner":
            return self.steps
        if self.overlap == "eager":
            return self.steps * inner_steps
        return 0


def parse_method(name: str | Method) -> Method:
    """'dp', 'diloco', 'streaming', optionally with '-inner<τ>' or '-eager<d>' (τ, d >= 1)."""
    if isinstance(name, Method):
        return name
    match = _METHOD_RE.match(name) if isinstance(name, str) else None
    if not match or (match.group(1) == "dp" and match.group(2)) or match.group(3) == "0":
        raise ValueError(
            f"method must be dp, diloco or streaming, the last two optionally followed by "
            f"-inner<τ> or -eager<d> with τ, d >= 1 (e.g. {', '.join(METHODS[1:5])}), "
            f"got {name!r}"
        )
    family, overlap, steps = match.groups()
    return Method(family, overlap or "none", int(steps or 0))


# --------------------------------------------------------------------------------------
# Link model
# --------------------------------------------------------------------------------------


def sync_hops(workload: Workload) -> int:
    """One-way delays a sync pays in sequence: 2·(M−1) around a ring, 2 through the star."""
    if workload.topology == "ring":
        return 2 * (workload.workers - 1)
    return 2


def link_costs(workload: Workload, bandwidth_gbps: float, latency_s: float) -> tuple[float, float]:
    """(seconds per payload bit, seconds of latency per sync) for one worker's sync."""
    m = workload.workers
    if workload.topology == "ring":
        if m == 1:
            return 0.0, 0.0
        per_bit = 2 * (m - 1) / m / (bandwidth_gbps * GBIT)
        return per_bit, sync_hops(workload) * latency_s
    server = workload.server_bandwidth_gbps or bandwidth_gbps
    per_bit = 2 * max(1 / (bandwidth_gbps * GBIT), m / (server * GBIT))
    return per_bit, sync_hops(workload) * latency_s


def traffic_per_sync(workload: Workload, payload_bytes: float) -> dict[str, float]:
    """Bytes each worker sends and receives for one sync, and the server's each way (star)."""
    m = workload.workers
    if workload.topology == "ring":
        each = 2 * (m - 1) / m * payload_bytes
        return {"sent_per_worker": each, "received_per_worker": each, "server_each_way": 0.0}
    return {"sent_per_worker": payload_bytes, "received_per_worker": payload_bytes,
            "server_each_way": m * payload_bytes}


# --------------------------------------------------------------------------------------
# Syncs and their timing
# --------------------------------------------------------------------------------------

_NON_BLOCK = -1  # chunk id for the embedding/norm/head


def _syncs(workload: Workload, method: Method) -> tuple[int, float, list[list[int]], list[float]]:
    """(period in inner steps, bits per value, block ids of each sync in one period, and the
    non-block values each sync carries)."""
    everything = [*range(workload.layers), _NON_BLOCK]
    if method.family == "dp":
        return 1, bits_per_value(workload.grad_precision, workload.fp4_block_size,
                                 workload.fp4_scale_bits), [everything], [workload.non_block_params]
    bits = bits_per_value(workload.precision, workload.fp4_block_size, workload.fp4_scale_bits)
    if method.family == "diloco":
        return workload.inner_steps, bits, [everything], [workload.non_block_params]
    fragments = fragment_blocks(workload.layers, workload.fragments, workload.fragment_pattern)
    # The non-block rows level the fragments, as strategies/fragments.py shares them out.
    shares = level_quotas([round(len(held) * workload.block_params) for held in fragments],
                          round(workload.non_block_params))
    return workload.inner_steps, bits, [[*held, _NON_BLOCK] for held in fragments], list(map(float, shares))


def _ready(workload: Workload, block: int) -> float:
    """When a block's values are final, in steps from the start of the syncing step."""
    if block == _NON_BLOCK:
        return 1.0
    backward = 1.0 - FORWARD_SHARE
    return FORWARD_SHARE + (workload.layers - block) * backward / workload.layers


def _needed(workload: Workload, block: int, overlap_steps: int) -> float:
    """When the next forward pass needs the synced block, in steps (same origin)."""
    start = 1.0 + overlap_steps
    return start if block == _NON_BLOCK else start + block * FORWARD_SHARE / workload.layers


def _exposed_seconds(workload: Workload, blocks: list[int], non_block: float, bits: float,
                     overlap_steps: int, per_bit: float, latency: float) -> tuple[float, float]:
    """(seconds the compute waits for this sync, seconds the link is busy with it)."""
    t = workload.step_time
    ready = {b: _ready(workload, b) * t for b in blocks}
    if workload.topology == "star":  # Flower ships the message whole
        last = max(ready.values())
        ready = dict.fromkeys(blocks, last)
    link_free, worst, busy = 0.0, 0.0, 0.0
    for block in sorted(blocks, key=lambda b: ready[b]):
        size = non_block if block == _NON_BLOCK else workload.block_params
        transfer = size * bits * per_bit
        link_free = max(link_free, ready[block]) + transfer
        busy += transfer
        if size > 0:
            worst = max(worst, link_free + latency - _needed(workload, block, overlap_steps) * t)
    return worst, busy


# --------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    method: str
    bandwidth_gbps: float
    latency_s: float
    cu: float  # compute time / wall time
    steps: int
    compute_seconds: float
    wall_seconds: float  # for `steps` inner steps
    period_steps: int  # 1 for dp, H for the rest
    syncs_per_period: int
    payload_bytes_per_sync: float  # mean over the period's syncs
    sent_bytes_per_worker_per_sync: float
    received_bytes_per_worker_per_sync: float
    server_bytes_each_way_per_sync: float  # star only
    exposed_seconds_per_period: float
    link_utilization: float  # link busy time / wall time


def _check_link(bandwidth_gbps: float, latency_s: float) -> None:
    _require(isinstance(bandwidth_gbps, (int, float)) and bandwidth_gbps > 0, "bandwidth_gbps",
             "must be > 0 (math.inf allowed)", bandwidth_gbps)
    _require(isinstance(latency_s, (int, float)) and 0 <= latency_s < math.inf, "latency_s",
             "must be a finite number >= 0", latency_s)


def predict(workload: Workload, method: str | Method, bandwidth_gbps: float,
            latency_s: float = 0.0, steps: int | None = None) -> Prediction:
    """CU and wall time of `method` at `bandwidth_gbps` (Gbit/s per worker, each way)."""
    method = parse_method(method)
    _check_link(bandwidth_gbps, latency_s)
    steps = workload.inner_steps if steps is None else steps
    _require(isinstance(steps, int) and steps >= 1, "steps", "must be an int >= 1", steps)

    period, bits, syncs, non_block = _syncs(workload, method)
    per_bit, latency = link_costs(workload, bandwidth_gbps, latency_s)
    overlap = method.overlap_steps(workload.inner_steps)
    exposed = busy = 0.0
    for blocks, values in zip(syncs, non_block):
        wait, link = _exposed_seconds(workload, blocks, values, bits, overlap, per_bit, latency)
        exposed += max(0.0, wait)
        busy += link
    compute = period * workload.step_time
    wall = max(compute + exposed, busy)
    cu = compute / wall

    payload_bytes = (workload.params * bits / 8) / len(syncs)
    traffic = traffic_per_sync(workload, payload_bytes)
    return Prediction(
        method=method.name, bandwidth_gbps=bandwidth_gbps, latency_s=latency_s, cu=cu,
        steps=steps, compute_seconds=steps * workload.step_time,
        wall_seconds=steps * workload.step_time / cu, period_steps=period,
        syncs_per_period=len(syncs), payload_bytes_per_sync=payload_bytes,
        sent_bytes_per_worker_per_sync=traffic["sent_per_worker"],
        received_bytes_per_worker_per_sync=traffic["received_per_worker"],
        server_bytes_each_way_per_sync=traffic["server_each_way"],
        exposed_seconds_per_period=exposed, link_utilization=busy / wall,
    )


def bandwidth_for_cu(workload: Workload, method: str | Method, target_cu: float,
                     latency_s: float = 0.0, rel_tol: float = 1e-6) -> float:
    """Smallest bandwidth (Gbit/s) at which `method` reaches `target_cu`.

    inf if no bandwidth reaches it (see the module docstring), 0.0 if any bandwidth does.
    """
    method = parse_method(method)
    _require(isinstance(target_cu, (int, float)) and 0 < target_cu <= 1, "target_cu",
             "must be in (0, 1]", target_cu)
    _check_link(1.0, latency_s)

    def reaches(bandwidth: float) -> bool:
        return predict(workload, method, bandwidth, latency_s).cu >= target_cu * (1 - 1e-12)

    if not reaches(_BANDWIDTH_CEILING_GBPS):
        return math.inf
    if reaches(_BANDWIDTH_FLOOR_GBPS):
        return 0.0
    lo, hi = _BANDWIDTH_FLOOR_GBPS, _BANDWIDTH_CEILING_GBPS  # CU(lo) < target <= CU(hi)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def plan_table(workload: Workload, methods: Sequence[str] = METHODS,
               targets: Sequence[float] = CU_TARGETS, latency_s: float = 0.0,
               bandwidth_gbps: float | None = None, steps: int | None = None) -> str:
    """Markdown table: Gbit/s needed per target CU, per method (+ CU at `bandwidth_gbps`)."""
    head = ["method", "payload/sync"] + [f"Gbit/s for {t:.0%}" for t in targets]
    if bandwidth_gbps is not None:
        k = workload.inner_steps if steps is None else steps
        head += [f"CU at {bandwidth_gbps:g} Gbit/s", f"wall s / {k} steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        method = parse_method(name)
        ref = predict(workload, method, math.inf, latency_s)
        row = [method.name, format_bytes(ref.payload_bytes_per_sync)]
        row += [_fmt_gbps(bandwidth_for_cu(workload, method, t, latency_s)) for t in targets]
        if bandwidth_gbps is not None:
            p = predict(workload, method, bandwidth_gbps, latency_s, steps)
            row += [f"{p.cu:.1%}", f"{p.wall_seconds:.4g}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt_gbps(x: float) -> str:
    if math.isinf(x):
        return "unreachable"
    return "any" if x == 0 else f"{x:.3g}"


# --------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------


def plot_cu_vs_bandwidth(workload: Workload, path: str, methods: Sequence[str] = METHODS,
                         latency_s: float = 0.0,
                         bandwidth_range: tuple[float, float] | None = None) -> str:
    """Write a PNG of CU (%) against bandwidth (Gbit/s, log axis), one line per method."""
    # The Agg canvas directly: no display needed, and pyplot's global backend is left alone.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parsed = [parse_method(m) for m in methods]
    if bandwidth_range is None:  # from a tenth of the easiest 50 % to 10x the hardest 99 %
        needs = [bandwidth_for_cu(workload, m, t, latency_s) for m in parsed for t in (0.5, 0.99)]
        finite = [b for b in needs if 0 < b < math.inf] or [1.0]
        bandwidth_range = (min(finite) / 10, max(finite) * 10)
    lo, hi = bandwidth_range
    _require(0 < lo < hi, "bandwidth_range", "must be (low, high) with 0 < low < high",
             bandwidth_range)
    grid = np.logspace(math.log10(lo), math.log10(hi), 300)
    colors = {"dp": "black", "diloco": "tab:blue", "streaming": "tab:orange"}
    dashes = {"none": "-", "inner": "--", "eager": ":"}
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for m in parsed:
        style = "-." if m.overlap == "eager" and m.steps >= 2 else dashes[m.overlap]
        ax.plot(grid, [100 * predict(workload, m, float(b), latency_s).cu for b in grid],
                label=m.name, color=colors[m.family], linestyle=style)
    ax.set_xscale("log")
    ax.set_ylim(0, 101)
    ax.set_xlabel("bandwidth per worker (Gbit/s)")
    ax.set_ylabel("compute utilization (%)")
    ax.set_title(f"N={workload.params:.3g}, L={workload.layers}, T={workload.step_time:g} s, "
                 f"M={workload.workers}, H={workload.inner_steps}, P={workload.fragments}, "
                 f"{workload.precision}, latency {latency_s:g} s", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------
# CLI: fl-diloco plan ...
# --------------------------------------------------------------------------------------


def _number(kind: type, low: float, low_ok: bool, what: str):
    def parse(text: str):
        try:
            value = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if kind is int and float(text) != value:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if not (math.isfinite(value) and (value >= low if low_ok else value > low)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_POS_FLOAT = _number(float, 0, False, "a number > 0")
_NONNEG_FLOAT = _number(float, 0, True, "a number >= 0")
_POS_INT = _number(int, 1, True, "an integer >= 1")


def _build_parser() -> argparse.ArgumentParser:
    from fl_diloco.model import PRESETS  # imports torch: only when the CLI runs

    p = argparse.ArgumentParser(
        prog="fl-diloco plan",
        description="Predict compute utilization (CU) per method, and the bandwidth each "
                    "needs for a target CU. Prints a Markdown table.",
        epilog="The model (ring or star, per-block slack, how overlap hides a sync, the "
               "per-round overhead) is written out in the docstring of fl_diloco/planner.py; "
               "CU and the eager-updates paper's 1B table it is checked against are in "
               "docs/algorithms.md#compute-utilization.",
    )
    p.add_argument("--mode", choices=MODES, default="steady",
                   help="steady (default): what a long run needs; paper: the papers' short "
                        "simulation, to compare with their tables (fl-diloco plan --mode paper "
                        "--help)")
    m = p.add_argument_group("model (one of)")
    m.add_argument("--model", choices=list(PRESETS), help="a preset from fl_diloco.model")
    m.add_argument("--params", type=_POS_FLOAT, help="parameter count N (with --layers)")
    m.add_argument("--layers", type=_POS_INT, help="transformer blocks L (with --params)")
    m.add_argument("--non-block-params", type=_NONNEG_FLOAT, default=0.0,
                   help="embedding/norm/head parameters inside N (default 0)")
    t = p.add_argument_group("step time (one of)")
    t.add_argument("--step-time", type=_POS_FLOAT, help="seconds per inner step")
    t.add_argument("--tokens-per-step", type=_POS_FLOAT, help="tokens per inner step")
    t.add_argument("--mfu", type=_POS_FLOAT, help="model FLOPs utilization in (0, 1]")
    t.add_argument("--peak-flops", type=_POS_FLOAT, help="peak FLOP/s of one worker")
    t.add_argument("--from-run", metavar="RUN_DIR",
                   help="the step time a run measured (its summary.json), and its model "
                        "unless --model or --params is given")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=_POS_INT, default=2, help="M sites (default 2)")
    r.add_argument("--inner-steps", type=_POS_INT, default=100, help="H (default 100)")
    r.add_argument("--fragments", type=_POS_INT, help="P (default: 3 blocks per fragment)")
    r.add_argument("--layers-per-fragment", type=_POS_INT,
                   help="blocks per fragment instead of --fragments (paper: 3)")
    r.add_argument("--fragment-pattern", choices=FRAGMENT_PATTERNS, default="strided")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="outer gradients on the wire (default fp32)")
    r.add_argument("--dp-precision", choices=PRECISIONS, default="bf16",
                   help="data-parallel gradients on the wire (default bf16)")
    r.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated (default: {','.join(METHODS)})")
    n = p.add_argument_group("network")
    n.add_argument("--topology", choices=TOPOLOGIES, default="ring",
                   help="ring all-reduce between sites, or Flower's star (default ring)")
    n.add_argument("--server-bandwidth", type=_POS_FLOAT,
                   help="SuperLink Gbit/s for --topology star (default: same as the workers')")
    n.add_argument("--latency", type=_NONNEG_FLOAT, default=0.0,
                   help="one-way delay per hop in s (default 0); a ring sync pays 2(M-1) "
                        "hops, a star sync 2")
    n.add_argument("--sync-overhead", type=_NONNEG_FLOAT, default=0.0,
                   help="fixed seconds per sync that no bandwidth removes, e.g. a Flower "
                        "deployment's per-round overhead (several s; "
                        "docs/algorithms.md#flower-constraints); added to the "
                        "latency as overhead / hops per sync (default 0)")
    n.add_argument("--overhead-from", metavar="FILE",
                   help="--sync-overhead as a deployment measured it: a deployment bench's "
                        "output (its last line, saved to FILE: bench/deployment_overlap.py "
                        "... | tail -n 1 > FILE) or a diloco run's summary.json (its workers' "
                        "idle seconds per steady round)")
    n.add_argument("--bandwidth", type=_POS_FLOAT, help="Gbit/s: add CU and wall-time columns")
    n.add_argument("--steps", type=_POS_INT,
                   help="inner steps for the wall-time column (default H)")
    o = p.add_argument_group("output")
    o.add_argument("--targets", default="50,80,90,95,99",
                   help="CU targets in %% (default 50,80,90,95,99)")
    o.add_argument("--plot", metavar="PATH", help="write a PNG of CU vs bandwidth (default: none)")
    return p


def _workload_from_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> Workload:
    run_vocab = None  # a run's own vocabulary, for its preset's exact parameter count
    if a.from_run is not None:
        if any(x is not None for x in (a.step_time, a.tokens_per_step, a.mfu, a.peak_flops)):
            p.error("--from-run excludes --step-time/--tokens-per-step/--mfu/--peak-flops")
        a.step_time, run_config = step_time_from_run(a.from_run)
        if a.model is None and a.params is None:
            a.model = MODEL_ALIASES.get(run_config["model"], run_config["model"])
            run_vocab = run_config["vocab_size"]
    if (a.model is None) == (a.params is None):
        p.error("give either --model PRESET or --params N with --layers L")
    if a.params is not None and a.layers is None:
        p.error("--params needs --layers")
    if a.model is not None and a.layers is not None:
        p.error("--layers goes with --params, not with --model")
    flops = (a.tokens_per_step, a.mfu, a.peak_flops)
    if a.step_time is None and None in flops:
        p.error("give --step-time, or all of --tokens-per-step, --mfu and --peak-flops")
    if a.step_time is not None and any(x is not None for x in flops):
        p.error("--step-time excludes --tokens-per-step/--mfu/--peak-flops")
    if a.mfu is not None and a.mfu > 1:
        p.error(f"--mfu must be in (0, 1], got {a.mfu}")
    if a.fragments is not None and a.layers_per_fragment is not None:
        p.error("give --fragments or --layers-per-fragment, not both")

    if a.model is not None:
        from fl_diloco.model import count_parameters, model_config

        cfg = model_config(a.model, vocab_size=run_vocab)
        params, layers = float(count_parameters(cfg)), cfg.n_layers
    else:
        params, layers = a.params, a.layers
    step_time = a.step_time or step_time_from_flops(params, *flops)
    per_fragment = a.layers_per_fragment or PAPER_BLOCKS_PER_FRAGMENT
    if a.layers_per_fragment is not None and per_fragment > layers:  # the default fits any L
        p.error(f"--layers-per-fragment must be between 1 and the model's {layers} layers, "
                f"got {per_fragment}")
    fragments = a.fragments or max(1, layers // per_fragment)
    if fragments > layers:
        p.error(f"--fragments must be between 1 and the model's {layers} layers, got {fragments}")
    if a.model is None and a.non_block_params >= params:
        p.error(f"--non-block-params must be < --params ({params:g}), got {a.non_block_params:g}")
    if a.server_bandwidth is not None and a.topology != "star":
        p.error("--server-bandwidth only applies to --topology star")
    common = {"step_time": step_time, "workers": a.workers, "inner_steps": a.inner_steps,
              "fragments": fragments, "precision": a.precision,
              "grad_precision": a.dp_precision, "fragment_pattern": a.fragment_pattern,
              "topology": a.topology, "server_bandwidth_gbps": a.server_bandwidth}
    if a.model is not None:
        return workload_from_preset(a.model, vocab_size=run_vocab, **common)
    return Workload(params=params, layers=layers, non_block_params=a.non_block_params, **common)


def _parse_list(p: argparse.ArgumentParser, flag: str, text: str, parse) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        p.error(f"{flag} must not be empty")
    try:
        return [parse(s) for s in items]
    except ValueError as err:
        p.error(f"{flag}: {err}")


def _target(text: str) -> float:
    value = float(text) / 100
    if not 0 < value <= 1:
        raise ValueError(f"each target must be a percentage in (0, 100], got {text!r}")
    return value


def _describe(workload: Workload, methods: Sequence[str], latency_s: float) -> str:
    w = workload
    bits = bits_per_value(w.precision, w.fp4_block_size, w.fp4_scale_bits)
    text = (f"N = {w.params:,.0f} params ({w.non_block_params:,.0f} outside the blocks), "
            f"L = {w.layers}, T = {w.step_time:.4g} s/step, M = {w.workers} ({w.topology}),\n"
            f"H = {w.inner_steps}, P = {w.fragments} ({w.fragment_pattern}), wire {w.precision} "
            f"({bits:g} bits/value; dp {w.grad_precision}), latency {latency_s:g} s")
    streaming = any(parse_method(m).family == "streaming" for m in methods)
    if streaming and w.inner_steps % w.fragments:
        text += (f"\nnote: H = {w.inner_steps} is not a multiple of P = {w.fragments}: training "
                 f"rejects that; the timing model uses H/P = "
                 f"{w.inner_steps / w.fragments:g} steps as is")
    return text


MODES = ("steady", "paper")


def _mode(argv: list[str]) -> tuple[str, list[str]]:
    """`--mode paper` hands the rest of the command line to fl_diloco/planner_paper.py (any
    other value goes to the steady-state parser, which says what is allowed)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--mode", default="steady")
    known, rest = probe.parse_known_args(argv)
    return known.mode, (rest if known.mode == "paper" else list(argv))


def main(argv: list[str] | None = None) -> int:
    """`fl-diloco plan ...`: print the planning table; 0 on success, 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    mode, rest = _mode(argv)
    if mode == "paper":
        from fl_diloco.planner_paper import main as paper_main

        return paper_main(rest)
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        workload = _workload_from_args(parser, args)
        methods = _parse_list(parser, "--methods", args.methods, lambda s: parse_method(s).name)
        targets = _parse_list(parser, "--targets", args.targets, _target)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return int(stop.code or 0)
    except ValueError as err:  # anything the flag checks above did not catch
        print(f"fl-diloco plan: error: {err}", file=sys.stderr)
        return 2

    latency, overhead, source = args.latency, args.sync_overhead, None
    if args.overhead_from is not None:
        if overhead:
            print("fl-diloco plan: error: give --sync-overhead or --overhead-from, not both",
                  file=sys.stderr)
            return 2
        try:
            overhead, source = overhead_from_file(args.overhead_from)
        except ValueError as err:
            print(f"fl-diloco plan: error: {err}", file=sys.stderr)
            return 2
    if overhead:
        if sync_hops(workload) == 0:
            print("fl-diloco plan: error: a per-sync overhead needs communication (M >= 2 on a "
                  "ring, or --topology star)", file=sys.stderr)
            return 2
        latency += overhead / sync_hops(workload)
    print(_describe(workload, methods, latency))
    if overhead:
        measured = f"; overhead measured by the {source}" if source else ""
        print(f"(latency = {args.latency:g} s link delay + {overhead:.4g} s per-sync "
              f"overhead / {sync_hops(workload)} hops{measured})")
    print()
    print(plan_table(workload, methods, targets, latency, args.bandwidth, args.steps))
    if args.plot:
        plot_cu_vs_bandwidth(workload, args.plot, methods, latency)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
