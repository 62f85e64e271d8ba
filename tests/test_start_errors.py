"""A run that cannot work says why in one line and exits 2 before anything starts.

Each case goes through `fl-diloco train` (cli.main, Hydra included) with the simulation
replaced by a stub that fails the test if it is reached: the error must come before Ray,
Flower or any worker, and before the run's out_dir exists.
"""

import pytest
import torch

from fl_diloco import simulation
from fl_diloco.cli import main


@pytest.fixture
def nothing_starts(monkeypatch):
    def simulate(cfg):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(simulation, "simulate", simulate)


def data_dirs(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.txt").write_text("To be, or not to be.\n\nThat is the question.\n")
    (binary / "b.txt").write_bytes(bytes(range(256)) * 8)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Où est la bibliothèque ?\n".encode("latin-1"))
    return {"missing": tmp_path / "missing", "empty_dir": empty_dir, "empty_file": tmp_path / "empty.txt",
            "binary": binary, "latin1": latin1}


CASES = [
    # (override, what the one line must name)
    ("rounds=abc", ["rounds", "int", "'abc'"]),
    ("rounds=-1", ["rounds", ">= 1", "-1"]),
    ("outer_lr=0", ["outer_lr", "> 0"]),
    ("wire_precision=fp16", ["wire_precision", "fp16", "fp32, bf16, fp8, fp4"]),
    ("data_source={missing}", ["data_source=", "missing", "no such file"]),
    ("data_source={empty_dir}", ["data_source=", "empty", "holds no"]),
    ("data_source={empty_file}", ["data_source=", "empty.txt", "is empty"]),
    ("data_source={binary}", ["data_source=", "b.txt", "binary"]),
    ("data_source={latin1}", ["data_source=", "latin1.txt", "not UTF-8"]),
    ("streaming=true fragments=4 inner_steps=8", ["fragments=4", "model=tiny has 2"]),
]


@pytest.mark.parametrize("override, named", CASES, ids=[c[0].split("{")[0] + c[0].split("{")[-1].rstrip("}")
                                                         for c in CASES])
def test_a_bad_value_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, nothing_starts,
                                                                   override, named):
    out_dir = tmp_path / "run"
    code = main(["train", *override.format(**data_dirs(tmp_path)).split(), f"out_dir={out_dir}"])
    captured = capsys.readouterr()
    assert code == 2
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: ") and all(word in line for word in named), line
    assert "Traceback" not in captured.out + captured.err
    assert not out_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, nothing_starts):
    assert main(["train", "device=cuda", f"out_dir={tmp_path / 'run'}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "device='cuda'" in line and "CUDA is not available" in line
    assert not (tmp_path / "run").exists()


def test_a_text_directory_passes_the_data_check(tmp_path):
    from fl_diloco.config import RunConfig
    from fl_diloco.preflight import check_data_source

    (tmp_path / "a.txt").write_text("Now is the winter of our discontent. Ünïcödé is fine.\n" * 400)
    check_data_source(RunConfig(data_source=str(tmp_path)))  # raises if it does not pass


def test_encoding_errors_replace_lets_a_latin1_text_file_through(tmp_path):
    from fl_diloco.config import ConfigError, RunConfig
    from fl_diloco.preflight import check_data_source

    latin1 = data_dirs(tmp_path)["latin1"]
    with pytest.raises(ConfigError, match="encoding_errors=replace"):
        check_data_source(RunConfig(data_source=str(latin1)))
    check_data_source(RunConfig(data_source=str(latin1), encoding_errors="replace"))


@pytest.mark.parametrize("runner", ["server", "dp"])
def test_a_start_that_fails_after_out_dir_exists_leaves_failed_json_saying_why(tmp_path, monkeypatch, runner):
    import json

    from fl_diloco import dp_baseline, server_app
    from fl_diloco.reporting import FAILED_NAME
    from tests.conftest import small_config

    def broken_corpus(data_config):
        raise OSError("the disk went away")

    module = server_app if runner == "server" else dp_baseline
    monkeypatch.setattr(module, "load_corpus", broken_corpus)
    cfg = small_config(tmp_path, algorithm="diloco" if runner == "server" else "dp")
    with pytest.raises(OSError):
        server_app.run_server(None, cfg) if runner == "server" else dp_baseline.train_data_parallel(cfg)
    failure = json.loads((tmp_path / "run" / FAILED_NAME).read_text())
    assert failure["error"] == "OSError: the disk went away" and "Traceback" in failure["traceback"]
