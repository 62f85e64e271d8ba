"""A site of several ranks (clients/site.py): two DDP ranks with batch b each train exactly
like one process with batch 2b on the same samples, and a rank that dies takes its group down
and the node's worker comes back without leaving any process behind."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from clients.site import RankSlice, ShardLayout
from fl_diloco.data import BatchStream
from strategies.fragments import select
from tests.conftest import small_config
from tests.in_process import run_in_process
from tests.test_fault_processes import (SMALL, _kill_session, _records, _short_dir, _train, _wait_for,
                                        _worker_pids)
from tests.test_reference import _config, _start, references  # noqa: F401 - references is a fixture
from tests.tolerance import assert_same_trajectory


def test_rank_slices_are_disjoint_and_together_the_sites_batch():
    sequences = torch.arange(40 * 5).reshape(40, 5).numpy()
    site = BatchStream(sequences, batch_size=6, seed=3)
    ranks = [RankSlice(BatchStream(sequences, batch_size=6, seed=3), r, 3) for r in range(3)]
    for _ in range(9):  # past an epoch boundary
        inputs, _ = site.next_batch()
        rows = [s.next_batch()[0] for s in ranks]
        assert all(len(r) == 2 for r in rows)
        assert torch.equal(torch.cat(rows), inputs)


@pytest.mark.parametrize("rows, ranks", [(10, 3), (2, 3)])
def test_a_ranks_outer_state_is_the_rows_of_a_fragment_its_fsdp_slice_holds(rows, ranks):
    # FSDP2 slices dim 0 like torch.chunk; a fragment's row range may cut across those slices.
    full = {"w": torch.arange(rows * 2.0).reshape(rows, 2), "b": torch.arange(float(rows))}
    keys = [f"w[1:{rows}]", "b"]
    layouts = [ShardLayout(keys, {n: t.shape for n, t in full.items()}, r, ranks) for r in range(ranks)]
    slices = [{n: t.chunk(ranks)[r] if r < len(t.chunk(ranks)) else t[:0] for n, t in full.items()}
              for r in range(ranks)]
    for key, expected in select(full, keys).items():
        pieces = [select(slices[r], [layouts[r].local_keys[key]]).popitem()[1] for r in range(ranks)]
        assert [len(p) for p in pieces] == layouts[0].rows[key]
        assert torch.equal(torch.cat(pieces), expected)
        assert layouts[0].shapes[key] == expected.shape


@pytest.mark.parametrize("variant", ["diloco", "eager-d1", "streaming-tau1-alpha0.5"])
def test_two_ranks_with_batch_b_follow_one_process_with_batch_2b(variant, tmp_path, references):
    # The reference trains each site in one process on batches of 4 (small_config); here each
    # site is 2 worker ranks of 2 sequences, the same 4 per step, gradients averaged by DDP.
    cfg = _config(tmp_path, variant)
    site_cfg = cfg.replace(ranks_per_worker=2, batch_size=cfg.batch_size // 2)
    strategy, _ = run_in_process(site_cfg)
    assert_same_trajectory(strategy.params, references(variant).global_params, _start(cfg))


@pytest.mark.parametrize("variant, resync_after", [("streaming-tau1-alpha0.5", 0), ("eager-d1", 0),
                                                   ("diloco", 2)])
def test_an_fsdp_site_trains_like_a_ddp_site(variant, resync_after, tmp_path, references):
    # Sharded: each rank keeps the outer state of its slice (row ranges of a parameter cut across
    # the ranks' slices under streaming), rank 0 assembles Δ and scatters the averages. Same
    # reference as the DDP sites above, so FSDP matches DDP as well. A diloco site re-prepared
    # from the server's state after a checkpointed round (a resume: each rank takes its slice of θ,
    # of the outer momentum and of its AdamW moments) goes on as if it never stopped.
    cfg = _config(tmp_path, variant)
    site_cfg = cfg.replace(ranks_per_worker=2, batch_size=cfg.batch_size // 2, parallelism="fsdp",
                           checkpoint_every=1)
    strategy, _ = run_in_process(site_cfg, resync_after=resync_after)
    assert_same_trajectory(strategy.params, references(variant).global_params, _start(cfg))


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _is_rank(pid: int) -> bool:
    """A process torch.multiprocessing spawned (not its resource tracker)."""
    try:
        return b"spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_rank_takes_its_group_down_and_the_run_finishes(tmp_path):
    out_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    runtime = _short_dir("site")
    args = [*SMALL, "num_clients=2", "rounds=10", "checkpoint_every=0", "outer_lr=0.3",
            "ranks_per_worker=2", "batch_size=2", f"out_dir={out_dir}"]
    process = _train(args, runtime, log_path)
    ranks_seen: set[int] = set()
    try:
        _wait_for(lambda: len(_records(out_dir)) >= 2, process, 240, "round 1", log_path)
        workers = _worker_pids(runtime)
        followers = {w: [c for c in _children(w) if _is_rank(c)] for w in workers}
        assert len(workers) == 2 and all(followers.values()), followers
        ranks_seen.update(workers, *followers.values())
        os.kill(followers[workers[1]][0], signal.SIGKILL)
        _wait_for(lambda: not _alive(workers[1]), process, 60, "the broken site's rank 0 to exit", log_path)
        while process.poll() is None:  # note the restarted site's ranks too
            for worker in _worker_pids(runtime):
                ranks_seen.update([worker, *_children(worker)])
            time.sleep(0.5)
        assert process.returncode == 0, log_path.read_text()[-4000:]
    finally:
        _kill_session(process)
    participants = [r["participants"] for r in _records(out_dir) if r["round"]]
    assert 1 in participants, participants  # a round closed without the broken site
    assert participants[-1] == 2, participants  # the restarted site took the state and rejoined
    assert "sent it the state" in log_path.read_text()  # a fresh group, resynced by the server
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ranks_seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ranks_seen if _alive(pid)], "ranks left behind after the run"
