"""The config groups under conf/: every option composes to a valid RunConfig and really sets
what its file says, the options cover every algorithm, preset and wire precision, and a plain
KEY=VALUE override still wins over a group option."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fl_diloco.cli import config_groups
from fl_diloco.config import ALGORITHMS, MODEL_ALIASES, WIRE_PRECISIONS, RunConfig
from fl_diloco.model import PRESETS

CONF = Path(__file__).resolve().parent.parent / "conf"
OPTIONS = [(group, option) for group, options in config_groups().items() for option in options]


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)))


def test_the_groups_are_the_ones_the_cli_documents():
    assert set(config_groups()) == {"algorithm", "model", "data", "wire", "hardware"}
    assert len(OPTIONS) > 20


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_to_a_valid_config_that_has_its_values(group, option):
    values = composed(f"{group}={option}")
    cfg = RunConfig.from_mapping(values)  # unknown keys or bad values would raise here
    text = (CONF / group / f"{option}.yaml").read_text()
    assert text.startswith("# @package _global_"), "options set top-level RunConfig keys"
    for key, value in yaml.safe_load(text).items():
        assert getattr(cfg, key) == value, f"{group}={option} should set {key}={value}"


def test_options_cover_every_algorithm_preset_and_wire_precision():
    groups = config_groups()
    assert set(ALGORITHMS) <= set(groups["algorithm"])
    assert set(groups["model"]) == set(PRESETS) | set(MODEL_ALIASES)
    assert set(groups["wire"]) == set(WIRE_PRECISIONS)
    assert {"cpu", "gpu"} <= set(groups["hardware"])
    for name in ALGORITHMS:
        assert composed(f"algorithm={name}")["algorithm"] == name


def test_a_plain_override_wins_over_a_group_option():
    assert (composed("algorithm=eager", "delay=2")["delay"], composed("algorithm=eager")["delay"]) == (2, 1)
    assert composed("wire=fp4", "wire_precision=fp8")["wire_precision"] == "fp8"
    assert composed("wire_precision=fp8")["wire_precision"] == "fp8"  # no group needed
    streaming = composed("algorithm=streaming-tau1", "overlap_steps=0", "inner_steps=100")
    assert (streaming["streaming"], streaming["overlap_steps"], streaming["inner_steps"]) == (True, 0, 100)


def test_table_2_rows_are_group_options():
    # The small-scale Table 2 is one sweep over these (README, "Ablations").
    rows = {"dp": ("dp", 1, False, 0, 0.7), "diloco": ("diloco", 1, False, 0, 0.7),
            "streaming": ("diloco", 1, True, 0, 0.7), "streaming-tau1": ("diloco", 1, True, 1, 0.7),
            "delayed": ("delayed", 1, False, 0, 0.7), "delayed-low-lr": ("delayed", 1, False, 0, 0.35),
            "eager": ("eager", 1, False, 0, 0.7), "eager-d2": ("eager", 2, False, 0, 0.7)}
    for option, expected in rows.items():
        cfg = RunConfig.from_mapping(composed(f"algorithm={option}"))
        assert (cfg.algorithm, cfg.delay, cfg.streaming, cfg.overlap_steps, cfg.outer_lr) == expected, option
