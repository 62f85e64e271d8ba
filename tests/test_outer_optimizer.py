"""The outer step against torch.optim.SGD(nesterov=True), its sign, and the running average."""

import pytest
import torch

from strategies.outer_optimizer import WeightedAverage, nesterov_outer_step, outer_gradient, zeros_like


@pytest.mark.parametrize("lr,momentum", [(0.7, 0.9), (1.0, 0.0), (0.3, 0.5)])
def test_outer_step_matches_torch_sgd_nesterov(lr, momentum):
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen)}
    reference = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    sgd = torch.optim.SGD(reference.values(), lr=lr, momentum=momentum, nesterov=momentum > 0)
    buffers = zeros_like(params)
    for _ in range(5):
        grads = {n: torch.randn(t.shape, generator=gen) for n, t in params.items()}
        nesterov_outer_step(params, grads, buffers, lr, momentum)
        for n, p in reference.items():
            p.grad = grads[n].clone()
        sgd.step()
        for n in params:
            torch.testing.assert_close(params[n], reference[n].detach(), rtol=0, atol=1e-6)


def test_outer_step_on_a_quadratic_lowers_the_loss():
    # Loss ½‖θ − θ*‖². A worker that trains moves toward θ*; its outer gradient start − end
    # must then move the global θ toward θ* too. A flipped sign moves it away.
    target = torch.tensor([3.0, -2.0, 0.5])
    theta = {"w": torch.zeros(3)}
    local_end = theta["w"] + 0.1 * (target - theta["w"])  # a few inner steps of descent
    delta = outer_gradient(theta, {"w": local_end})
    assert torch.all(delta["w"] * (target - theta["w"]) < 0), "Δ = start − end points uphill"
    loss_before = 0.5 * (theta["w"] - target).square().sum()
    nesterov_outer_step(theta, delta, zeros_like(theta), lr=0.7, momentum=0.9)
    loss_after = 0.5 * (theta["w"] - target).square().sum()
    assert loss_after < loss_before


def test_weighted_average_is_the_weighted_mean():
    tensors = [{"x": torch.full((4,), float(i))} for i in range(1, 4)]
    avg = WeightedAverage()
    for t, w in zip(tensors, [1.0, 2.0, 5.0]):
        avg.add(t, w)
    torch.testing.assert_close(avg.result()["x"], torch.full((4,), (1 + 4 + 15) / 8))
    with pytest.raises(ValueError):
        WeightedAverage().result()
    with pytest.raises(ValueError):
        avg.add(tensors[0], 0.0)
