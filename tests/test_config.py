"""One source of configuration: RunConfig's defaults are what pyproject and conf/ say, and
bad values fail early with a message naming the key."""

import tomllib
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fl_diloco.cli import check_overrides, main
from fl_diloco.config import DEFAULTS, ConfigError, RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_repeats_the_dataclass_defaults():
    flwr_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_config == DEFAULTS


def test_hydra_config_repeats_the_dataclass_defaults():
    # What Hydra composes (config.yaml plus the group options its defaults list picks), and
    # config.yaml's own keys, which list every key for the reader.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        composed = OmegaConf.to_container(compose(config_name="config"))
    assert composed == DEFAULTS
    hydra_config = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    hydra_config = {k: v for k, v in hydra_config.items() if k not in ("defaults", "hydra")}
    assert hydra_config == DEFAULTS


@pytest.mark.parametrize("values,needle", [
    ({"inner_steps": 0}, "inner_steps must be >= 1"),
    ({"model": "huge"}, "choose one of"),
    ({"algorithm": "fedavg"}, "algorithm='fedavg' is not allowed; choose one of: dp, diloco"),
    ({"inner_step": 5}, "Did you mean 'inner_steps'"),
    ({"rounds": "many"}, "rounds must be of type int"),
    ({"rounds": 2.5}, "rounds must be of type int"),
    ({"rounds": True}, "rounds must be of type int"),
    ({"outer_momentum": 1.5}, "outer_momentum must be in [0, 1)"),
    ({"out_dir": "relative/path"}, "out_dir must be an absolute path"),
    ({"algorithm": "eager", "delay": 3}, "delay must be 1 or 2"),
    ({"algorithm": "eager", "weighting": "tokens"}, "needs weighting=uniform"),
    ({"fragments": 2}, "fragments=2 needs streaming=true"),
    ({"streaming": True, "fragments": 4, "inner_steps": 30}, "inner_steps=30 is not a multiple of fragments=4"),
    ({"streaming": True, "fragments": 2, "inner_steps": 30, "overlap_steps": 15}, "overlap_steps must be in [0, "),
    ({"streaming": True, "algorithm": "eager", "overlap_steps": 1}, "overlap_steps and mixing must stay 0"),
    ({"streaming": True, "mixing": 1.5}, "mixing must be in [0, 1]"),
    ({"streaming": "maybe"}, "streaming must be true or false"),
    ({"wire_precision": "int8"}, "wire_precision='int8' is not allowed"),
    ({"fragment_pattern": "random", "streaming": True}, "fragment_pattern='random'"),
    ({"document_unit": "sentence"}, "document_unit='sentence' is not allowed"),
    ({"encoding_errors": "ignore"}, "encoding_errors='ignore' is not allowed"),
])
def test_bad_values_name_the_key(values, needle):
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig.from_mapping(values)
    assert needle in str(err.value)


def test_flower_style_keys_and_string_values_are_accepted():
    cfg = RunConfig.from_mapping({"inner-steps": "12", "outer-lr": "0.5", "model": "tiny"})
    assert cfg.inner_steps == 12 and cfg.outer_lr == 0.5


def test_derived_schedule_values():
    cfg = RunConfig.from_mapping({"streaming": "true", "fragments": 3, "inner_steps": 30, "rounds": 5,
                                  "algorithm": "eager", "delay": 2, "wire_precision": "fp4"})
    assert (cfg.num_fragments, cfg.sync_interval, cfg.flower_rounds, cfg.staleness) == (3, 10, 15, 2)
    assert cfg.variant_label == "eager d=2, streaming P=3, fp4"
    assert RunConfig().staleness == 0 and RunConfig().flower_rounds == RunConfig().rounds


def test_cli_rejects_an_unknown_key_before_training(capsys):
    with pytest.raises(ConfigError, match="Did you mean 'num_clients'"):
        check_overrides(["num_client=4"])
    assert main(["train", "roundz=3"]) == 2
    assert "Did you mean 'rounds'" in capsys.readouterr().err


def test_more_partitions_than_documents_is_an_error_naming_the_key(tmp_path):
    from fl_diloco.data import load_corpus

    cfg = RunConfig.from_mapping({"max_documents": 20, "num_clients": 64, "seq_len": 32})
    corpus = load_corpus(cfg.data_config())
    with pytest.raises(ValueError, match="num_clients|num_partitions"):
        corpus.train_sequences(0, cfg.num_clients)
