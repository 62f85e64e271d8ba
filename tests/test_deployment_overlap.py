"""bench/deployment_overlap.py's reading of SuperNode logs and of its variants (pure, no
deployment): the figures that say whether a node served the rounds `eager` keeps in flight."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench

bench = load_bench("deployment_overlap")


def _line(second: float, message: str, level: str = "INFO") -> str:
    """One line as Flower 1.41 logs it with FLWR_LOG_LEVEL=DEBUG (coloured, millisecond stamp)."""
    whole, millis = int(second), round((second % 1) * 1000)
    return f"\x1b[92m{level} 2026-01-01 12:00:{whole:02d},{millis:03d}\x1b[0m:      {message}"


def _serve(start: float, label: str, kind: str = "train", pull: float = 1.0, load: float = 2.0,
           work: float = 3.0, push: float = 1.0) -> tuple[list[str], float]:
    """The node's lines for one message received at `start`; returns them and when it was sent."""
    t = start
    lines = [_line(t, label), _line(t, f"Receiving: {kind} message (ID: ab)"),
             _line(t + pull, "Received successfully"),
             _line(t + pull + load, "Loading ClientApp `fl_diloco.client_app:app`", "DEBUG")]
    sending = t + pull + load + work
    lines += [_line(sending, label), _line(sending, f"Sending: {kind} message (ID: cd)"),
              _line(sending + push, "Sent successfully")]
    return lines, sending + push


def _serial_log() -> str:
    lines, t = _serve(0.0, "[RUN 7]", kind="query.prepare")
    for r in (1, 2, 3):
        served, t = _serve(t + 0.1, f"[RUN 7, ROUND {r}]")
        lines += served
    lines += _serve(t + 5, "[RUN 7]", kind="query.shutdown")[0]
    return "\n".join(lines)


def test_a_serial_node_holds_one_round_and_its_cycle_is_push_pull_and_start():
    runs = bench.node_rounds(_serial_log())
    assert list(runs) == ["7"]
    rounds = runs["7"]
    assert sorted(rounds) == [1, 2, 3]  # the prepare and shutdown queries are no rounds
    assert rounds[2]["received_from"] - rounds[1]["sent"] == pytest.approx(0.1, abs=2e-3)
    service = bench.node_service(rounds, first_steady=2)
    # from round r − 1's reply reaching the node to round r's ClientApp: push 1 + 0.1 + pull 1 + load 2
    assert service == {"held_at_once": 1, "cycle_s": pytest.approx(4.1, abs=2e-3), "queued_share": 1.0}


def test_a_node_that_took_a_round_before_replying_to_the_last_holds_two():
    first, _ = _serve(0.0, "[RUN 7, ROUND 1]", work=10.0)
    second, _ = _serve(5.0, "[RUN 7, ROUND 2]")
    rounds = bench.node_rounds("\n".join(first[:4] + second[:4] + first[4:] + second[4:]))["7"]
    assert bench.node_service(rounds, first_steady=2)["held_at_once"] == 2


def test_serial_bound_is_one_rounds_compute_over_the_longer_of_it_and_the_cycle():
    nodes = [{"cycle_s": 6.0, "held_at_once": 1}, {"cycle_s": 8.0, "held_at_once": 1}]
    eager = {"compute_s_per_worker_round": 4.0, "rounds_in_flight": 2}
    assert bench.serial_bound(eager, nodes)["serial_bound_cu"] == pytest.approx(4.0 / 7.0)
    assert bench.serial_bound({**eager, "compute_s_per_worker_round": 9.0}, nodes)["serial_bound_cu"] == 1.0
    # one round in flight: the next message exists only once the last round closed
    assert bench.serial_bound({**eager, "rounds_in_flight": 1}, nodes)["serial_bound_cu"] is None


def test_variants_and_the_rounds_they_need():
    variants = bench.parse_variants("diloco, eager-p4,diloco-p2")
    assert [v.name for v in variants] == ["diloco", "eager-p4", "diloco-p2"]
    assert variants[1].run_config() == {"algorithm": "eager", "streaming": True, "fragments": 4}
    # 2 + d·P start-up Flower rounds, then 2 steady ones, in outer steps of P rounds
    assert [v.min_rounds() for v in variants] == [4, 2, 2]
    assert bench.Variant("eager").min_rounds() == 5
    for bad in ("dp", "eager-p0", "diloco,diloco", ""):
        with pytest.raises(Exception, match="--methods|each method"):
            bench.parse_variants(bad)


def test_each_runs_rounds_come_apart_by_flower_run_id(tmp_path):
    """One deployment serves the bench's runs one after the other; node_runs splits each node's
    log by run, in the order the runs came."""
    for node in (0, 1):
        lines = []
        for run, start in (("900", 0.0), ("35", 20.0)):
            lines += _serve(start, f"[RUN {run}, ROUND 1]")[0]
        (tmp_path / f"supernode-{node}.log").write_text("\n".join(lines))
    runs = bench.node_runs(tmp_path, 2)
    assert len(runs) == 2 and all(len(nodes) == 2 for nodes in runs)
    assert runs[0][1][1]["received_from"] < runs[1][0][1]["received_from"]
