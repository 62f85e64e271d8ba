"""bench/paper_table2.py's bookkeeping: one token budget, the right DiLoCo row to compare
with, the paper's claims read the right way round, and the gap read off the eval curves."""

import json

import pytest

from tests.conftest import load_bench

bench = load_bench("paper_table2")


def test_every_row_trains_the_same_tokens():
    budgets = {(v.name, v.config(0)["rounds"] * v.config(0)["inner_steps"] * v.config(0)["num_clients"])
               for rows in bench.GROUPS.values() for v in rows if v.config(0).get("algorithm") != "dp"}
    assert {tokens for _, tokens in budgets} == {bench.INNER_STEPS_PER_WORKER * bench.SETTINGS["num_clients"]}


def test_each_row_is_compared_with_diloco_at_its_own_settings():
    rows = {v.name: v for vs in bench.GROUPS.values() for v in vs}
    # the papers' tables compare at the same H, so the lowered-LR row meets DiLoCo at the default LR
    assert bench.diloco_of(rows["delayed-low-lr"], "table2").name == "diloco"
    assert bench.diloco_of(rows["eager-d1-H10"], "figure5").name == "diloco-H10"
    # the investigation varies one setting at a time and compares like with like
    assert bench.diloco_of(rows["eager-d1-lr0.35"], "investigate").name == "diloco-lr0.35"
    assert bench.diloco_of(rows["eager-d1-M4"], "investigate").name == "diloco-M4"
    assert bench.diloco_of(rows["eager-d1-inner-lr1e-3"], "investigate").name == "diloco-inner-lr1e-3"


@pytest.mark.parametrize("eager, delayed, eager2, verdicts", [
    (1.015, 1.30, 1.10, ["yes", "yes", "yes"]),
    (1.07, 2.0, 1.17, ["NO", "yes", "yes"]),
    (1.01, 1.02, 1.05, ["yes", "NO", "NO"]),
])
def test_claims_read_the_ratios_the_right_way_round(eager, delayed, eager2, verdicts):
    table2 = {"eager-d1": {"ratio_to_diloco": eager}, "delayed": {"ratio_to_diloco": delayed},
              "eager-d2": {"ratio_to_diloco": eager2}}
    found = bench.claims(table2)
    assert [line.split(": ")[1].split()[0] for line in found] == verdicts


def _fake_run(runs_dir, name, losses):
    out = runs_dir / name
    out.mkdir(parents=True)
    history = [{"tokens": 100 * k, "eval_loss": loss} for k, loss in enumerate(losses)]
    (out / bench.SUMMARY_NAME).write_text(json.dumps({"final_eval_loss": losses[-1], "eval_history": history}))


def test_gap_over_training_divides_the_seed_means_at_each_point(tmp_path):
    losses = [8.0, 6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.8, 3.7, 3.6, 3.5]
    for seed, shift in ((0, 0.0), (1, 0.2)):
        _fake_run(tmp_path, f"diloco-s{seed}", [x + shift for x in losses])
        _fake_run(tmp_path, f"eager-d1-s{seed}", [(x + shift) * (1 + k / 100) for k, x in enumerate(losses)])
    gap = bench.gap_over_training(bench.EAGER, bench.DILOCO, [0, 1, 2], tmp_path)  # seed 2 never ran
    assert list(gap) == list(bench.GAP_POINTS)
    # evaluation k of 10 sits at fraction k/10 (the earlier one on a tie); eager is (1 + k/100)
    # times DiLoCo in both seeds
    nearest = {0.1: 1, 0.25: 2, 0.5: 5, 0.75: 7, 1.0: 10}  # never evaluation 0, the untrained model
    assert gap == pytest.approx({f: 1 + k / 100 for f, k in nearest.items()})
    assert bench.gap_over_training(bench.EAGER, bench.DELAYED, [0], tmp_path) == {}


def test_gap_over_training_never_reads_the_untrained_model(tmp_path):
    # three evaluations (0, 100, 200 tokens): 10 % of the budget is nearest the untrained
    # model's, which every row shares, so the first trained evaluation stands in for it
    _fake_run(tmp_path, "diloco-s0", [7.0, 5.0, 4.0])
    _fake_run(tmp_path, "eager-d1-s0", [7.0, 5.5, 4.4])
    gap = bench.gap_over_training(bench.EAGER, bench.DILOCO, [0], tmp_path)
    assert gap[0.1] == pytest.approx(1.1) and gap[1.0] == pytest.approx(1.1)
