"""Load: a 16-client simulation completes, and aggregating a round needs O(model) memory.

The memory test measures peak RSS (not tracemalloc: torch allocates CPU tensors outside
Python's allocator, so tracemalloc does not see them) of one `aggregate_train` in a fresh
process, through bench/server_memory.py.
"""

import json
import math
import sys
from pathlib import Path

import pytest

from fl_diloco.reporting import METRICS_NAME
from fl_diloco.simulation import simulate
from tests.conftest import load_bench, small_config


def test_a_simulation_of_16_clients_completes(tmp_path):
    # 50 documents give every one of the 16 shards at least a batch of 2 (check_partitions).
    cfg = small_config(tmp_path, num_clients=16, inner_steps=2, rounds=2, batch_size=2,
                       max_documents=50, eval_sequences=16, eval_every=2, warmup_steps=1)
    summary = simulate(cfg)

    assert summary["rejected_replies"] == 0
    assert summary["tokens"] == 16 * 2 * 2 * cfg.batch_size * cfg.seq_len
    assert math.isfinite(summary["first_eval_loss"]) and math.isfinite(summary["final_eval_loss"])
    records = [json.loads(line) for line in (Path(cfg.out_dir) / METRICS_NAME).read_text().splitlines()]
    rounds = [r for r in records if r["round"] >= 1]
    assert [r["participants"] for r in rounds] == [16, 16]
    assert all(math.isfinite(r["train_loss"]) for r in rounds)
    assert len(summary["workers"]) == 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/self")
def test_aggregation_memory_does_not_grow_with_the_number_of_clients(tmp_path):
    """32 replies cost the strategy no more memory than 4: they are averaged as they arrive.

    Growth is peak RSS during `aggregate_train` over RSS just before, in fp32 copies of the
    model (tiny-1m, 5.9 MB). The strategy itself needs a handful (running sum, average, its
    wire copy, the reply being read, the first replies the outlier check holds); keeping every
    reply would add at least one copy per client, 28 more for M = 32 than for M = 4.
    """
    bench = load_bench("server_memory")
    args = bench.parse_args(["--model", "tiny"])
    copies = {}
    for clients in (4, 32):
        figures = bench.run_child("strategy", args, clients, tmp_path)
        copies[clients] = bench.growth(figures["baseline"], figures, figures["model_mb"])["growth_model_copies"]
    assert copies[32] - copies[4] < 4, copies
    assert copies[32] < 16, copies
