"""Objectives compose like lucent's, and each one's loss goes down when optimized."""

import pytest
import torch

from amrepro.objectives import activation, l2, reference_loss


def test_reference_loss_is_the_reference_formula():
    torch.manual_seed(0)
    act, x = torch.randn(3, 5), torch.randn(3, 5, 8)
    expected = -act.mean(dim=1) + 0.01 * (x ** 2).sum(dim=(1, 2))
    torch.testing.assert_close(reference_loss(0.01)(act, x), expected)
    assert reference_loss(0.01).name == "-activation + 0.01 * l2"


def test_composition_algebra():
    torch.manual_seed(1)
    act, x = torch.randn(2, 4), torch.randn(2, 4, 3)
    torch.testing.assert_close((activation() - l2())(act, x), act.mean(1) - (x ** 2).sum((1, 2)))
    torch.testing.assert_close((2 * activation())(act, x), 2 * act.mean(1))


@pytest.mark.parametrize("objective", [-activation(), l2(), reference_loss(0.01)], ids=repr)
def test_each_objective_goes_down(objective):
    """Property: Adam on x lowers every objective, for a smooth random 'neuron' act = tanh(x @ w)."""
    torch.manual_seed(2)
    w = torch.randn(8)
    x = torch.randn(4, 5, 8, requires_grad=True)
    opt = torch.optim.Adam([x], lr=1e-2)
    def loss():
        return objective(torch.tanh(x @ w), x)  # [runs]
    before = loss().detach()
    for _ in range(50):
        opt.zero_grad()
        loss().sum().backward()
        opt.step()
    assert (loss().detach() < before).all()
