"""The inner loop on accelerators' terms: bf16 autocast with fp32 state, gradient accumulation
equal to the full batch, no host synchronisation per step, torch.compile without
recompilation across outer updates, and the FLOPs/MFU accounting."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import clients.inner_loop as inner_loop
from clients.worker import build_trainer
from fl_diloco.config import ConfigError, resolve_precision
from fl_diloco.flops import PeakFlops, device_peak_flops, matmul_parameters, model_flops_per_token
from fl_diloco.model import Transformer, model_config
from fl_diloco.reporting import throughput
from tests.conftest import load_bench, small_config
from strategies.diloco import DiLoCo
from tests.in_process import run_in_process
from tests.tolerance import assert_same_trajectory

REPO = Path(__file__).resolve().parent.parent


def _gradients_of_first_step(monkeypatch, trainer) -> dict[str, torch.Tensor]:
    """The `.grad` each parameter holds when the first step's optimizer update begins."""
    seen = {}
    real = inner_loop.clip_and_step

    def spy(model, *args):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
        real(model, *args)

    monkeypatch.setattr(inner_loop, "clip_and_step", spy)
    trainer.train_step()
    monkeypatch.setattr(inner_loop, "clip_and_step", real)
    return seen


def test_accumulated_micro_batches_give_the_full_batch_step(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, batch_size=4)
    full = build_trainer(cfg, 0, 2, "cpu")
    accumulated = build_trainer(cfg.replace(micro_batch_size=1), 0, 2, "cpu")
    assert (full.micro_batches, accumulated.micro_batches) == (1, 4)
    start = full.parameters_fp32()

    # Adam hides a gradient scaled by a constant, so compare the gradients themselves: a
    # missing 1/4 or a micro-batch left out would be far outside float rounding.
    expected = _gradients_of_first_step(monkeypatch, full)
    actual = _gradients_of_first_step(monkeypatch, accumulated)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-8, msg=name)

    losses = [(full.train_step(), accumulated.train_step()) for _ in range(3)]
    for whole, mean_of_parts in losses:
        torch.testing.assert_close(mean_of_parts, whole, rtol=1e-6, atol=0)
    assert_same_trajectory(accumulated.parameters_fp32(), full.parameters_fp32(), start)


def test_micro_batch_size_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size=3 must divide batch_size=4"):
        small_config(tmp_path, batch_size=4, micro_batch_size=3)
    with pytest.raises(ConfigError, match="micro_batch_size=8"):
        small_config(tmp_path, batch_size=4, micro_batch_size=8)


def test_bf16_computes_the_matmuls_in_bf16_and_keeps_every_state_in_fp32(tmp_path):
    cfg = small_config(tmp_path, precision="bf16")
    assert resolve_precision("auto", "cpu") == "fp32"  # auto means bf16 on CUDA only
    trainer = build_trainer(cfg, 0, 2, "cpu")
    reference = build_trainer(cfg.replace(precision="fp32"), 0, 2, "cpu")
    matmul_dtypes = set()
    for module in trainer.model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, i, out: matmul_dtypes.add(out.dtype))

    loss, reference_loss = trainer.train_step(), reference.train_step()
    assert matmul_dtypes == {torch.bfloat16}
    assert loss.dtype == torch.float32  # the softmax and the loss stay fp32
    # Same batch, same weights: bf16 rounding moves the loss a little, not more.
    assert abs(loss.item() - reference_loss.item()) < 0.02 * reference_loss.item()
    for _ in range(2):
        trainer.train_step()
    for name, param in trainer.model.named_parameters():
        state = trainer.optimizer.state[param]
        assert param.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, name
    assert all(t.dtype == torch.float32 for t in trainer.parameters_fp32().values())


class _HostTransfers:
    """Counts the calls that bring a tensor's value to the host, made by this project's code
    (not by torch itself, nor by the tests)."""

    METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")
    # The packages themselves: a virtual environment may live inside the checkout (CI's does).
    PROJECT_CODE = tuple(str(REPO / package) + "/" for package in ("fl_diloco", "clients", "strategies"))

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, real):
        def method(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(self.PROJECT_CODE):
                self.calls.append(f"{name} from {caller}")
            return real(tensor, *args, **kwargs)
        return method


def test_an_inner_step_never_waits_for_the_device(tmp_path, monkeypatch):
    trainer = build_trainer(small_config(tmp_path, micro_batch_size=2), 0, 2, "cpu")
    transfers = _HostTransfers(monkeypatch)
    losses = [trainer.train_step() for _ in range(3)]
    assert transfers.calls == []
    assert all(loss.dim() == 0 for loss in losses)


def test_a_worker_reads_the_device_per_round_not_per_step(tmp_path, monkeypatch):
    transfers = _HostTransfers(monkeypatch)
    counts = {}
    for inner_steps in (2, 6):
        transfers.calls.clear()
        run_in_process(small_config(tmp_path / str(inner_steps), num_clients=1, rounds=2,
                                    inner_steps=inner_steps))
        counts[inner_steps] = len(transfers.calls)
    # What the project reads per round (the outer gradient, its norm, the mean loss) is the
    # same for H = 2 and H = 6: nothing is read per step.
    assert counts[2] == counts[6], counts


def test_compiled_model_is_not_recompiled_by_outer_updates(tmp_path, monkeypatch):
    compilations = []

    def counting_backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward  # run the captured graph as it is: no inductor build on CPU

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=counting_backend))
    torch._dynamo.reset()
    compiled_by_round = []
    aggregate = DiLoCo.aggregate_train

    def counting_rounds(self, server_round, replies):
        compiled_by_round.append(len(compilations))
        return aggregate(self, server_round, replies)
    monkeypatch.setattr(DiLoCo, "aggregate_train", counting_rounds)
    cfg = small_config(tmp_path, num_clients=2, rounds=3, compile=True)
    compiled, _ = run_in_process(cfg)
    # The forward pass really went through torch.compile in round 1; the two workers in one
    # process share the compiled code, and the outer updates written into the parameters
    # after rounds 1 and 2 compile nothing more.
    assert compiled_by_round[0] >= 1
    assert len(compilations) == compiled_by_round[0], compiled_by_round
    eager, _ = run_in_process(cfg.replace(compile=False))
    start = build_trainer(cfg, 0, 2, "cpu").parameters_fp32()
    assert_same_trajectory(compiled.params, eager.params, start)


def test_matmul_parameters_are_the_linear_weights():
    for tied in (False, True):
        cfg = model_config("tiny-1m")
        cfg = type(cfg)(**{**cfg.__dict__, "tie_embeddings": tied})
        model = Transformer(cfg)
        weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
        assert matmul_parameters(cfg) == sum(weights.values())
    cfg = model_config("1b")
    assert model_flops_per_token(cfg, 2048) - model_flops_per_token(cfg, 1024) == 12 * 24 * 1024 * 2048


def test_peak_flops_come_from_the_key_or_the_device_table(monkeypatch):
    assert device_peak_flops("cpu").flops is None and "peak_flops" in device_peak_flops("cpu").source
    assert device_peak_flops("cpu", 1e12) == PeakFlops(1e12, "the peak_flops key")
    for name, flops in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                        ("Tesla V100-SXM2-16GB", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak_flops("cuda:0").flops == flops, name


def test_workers_report_tokens_per_second_and_mfu_against_the_peak_they_were_given(tmp_path):
    _, (worker,) = run_in_process(small_config(tmp_path, num_clients=1, rounds=1, peak_flops=1e12))
    metrics = worker._replies[1]["metrics"]
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens"] / metrics["compute_seconds"])
    flops = model_flops_per_token(worker.trainer.model.cfg, worker.cfg.seq_len)
    assert metrics["mfu"] == pytest.approx(metrics["tokens_per_second"] * flops / 1e12)


def test_throughput_weights_mfu_by_compute_time():
    rows = [{"tokens": 100, "compute_seconds": 1.0, "mfu": 0.2},
            {"tokens": 300, "compute_seconds": 3.0, "mfu": 0.6}]
    assert throughput(rows) == (100.0, pytest.approx(0.5))
    assert throughput([*rows, {"tokens": 100, "compute_seconds": 1.0}]) == (100.0, None)
    assert throughput([]) == (None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_is_bf16_fused_and_matches_the_cpu_loss(tmp_path):
    cfg = small_config(tmp_path, device="cuda")
    trainer = build_trainer(cfg, 0, 2, "cuda")
    cpu = build_trainer(cfg.replace(device="cpu"), 0, 2, "cpu")
    assert trainer.precision == "bf16" and trainer.optimizer.defaults["fused"]
    losses = torch.stack([trainer.train_step() for _ in range(3)])
    cpu_losses = torch.stack([cpu.train_step() for _ in range(3)])
    assert losses.is_cuda and next(trainer.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(losses.cpu(), cpu_losses, rtol=0.02, atol=0)
    assert trainer.peak_flops.source  # a known GPU has a figure, an unknown one says why


def test_throughput_bench_runs_both_loops_and_ends_with_its_json(capsys):
    bench = load_bench("inner_loop_throughput")
    result = bench.main(["--model", "tiny", "--batch-size", "2", "--micro-batch-size", "1",
                         "--seq-len", "16", "--steps", "2", "--reps", "2", "--warmup", "1"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == result
    assert set(result["tokens_per_second"]) == {"inner_trainer", "plain"}
    assert result["ratio"] > 0 and result["mfu"] is None  # a CPU has no peak FLOP/s
