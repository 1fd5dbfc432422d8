import math

import pytest
import torch

from core.losses import pairwise_accuracy, soft_preference_loss


def bt(margin: float) -> float:
    return -math.log(1 / (1 + math.exp(-margin)))


def test_soft_loss_matches_hand_computed_values():
    rc, rr, p = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, 1.0]), torch.tensor([0.9, 0.6, 0.5])
    expected = [
        0.9 * bt(1.0) + 0.1 * bt(-1.0),
        0.6 * bt(-0.5) + 0.4 * bt(0.5),
        0.5 * bt(-2.0) + 0.5 * bt(2.0),
    ]
    assert soft_preference_loss(rc, rr, p).item() == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_reduces_to_standard_bradley_terry_at_p_one():
    rc, rr = torch.tensor([0.3, -2.0, 5.0]), torch.tensor([0.1, 1.0, -5.0])
    standard = -torch.nn.functional.logsigmoid(rc - rr).mean()
    assert soft_preference_loss(rc, rr, torch.ones(3)).item() == pytest.approx(standard.item(), rel=1e-6)


def test_symmetric_at_half_zero_gradient_at_equal_rewards():
    rc = torch.tensor([0.7, -1.2], requires_grad=True)
    rr = rc.detach().clone().requires_grad_(True)
    loss = soft_preference_loss(rc, rr, torch.full((2,), 0.5))
    loss.backward()
    assert torch.allclose(rc.grad, torch.zeros(2)) and torch.allclose(rr.grad, torch.zeros(2))
    # swapping chosen and rejected at p=0.5 gives the same loss
    a, b = torch.tensor([1.0]), torch.tensor([-0.5])
    half = torch.tensor([0.5])
    assert soft_preference_loss(a, b, half).item() == pytest.approx(soft_preference_loss(b, a, half).item())


def test_stable_for_large_margins_and_accuracy():
    big = soft_preference_loss(torch.tensor([1000.0]), torch.tensor([-1000.0]), torch.tensor([1.0]))
    assert math.isfinite(big.item()) and big.item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])) == 0.625
