"""Optimisation (docs/reference.md §4): learning-rate scaling, the warm-up + cosine schedule, LARC."""

import math

import pytest
import torch

from utils.optim import LARC, cosine_with_warmup
from utils.schema import scaled_learning_rate


def test_learning_rate_scaling_rules():
    assert scaled_learning_rate(0.75, "linear", 1024) == pytest.approx(24.0)
    assert scaled_learning_rate(0.1875, "linear", 1024) == pytest.approx(6.0)
    assert scaled_learning_rate(0.75, "sqrt", 1024) == pytest.approx(24.0)
    assert scaled_learning_rate(0.075, "sqrt", 1024) == pytest.approx(2.4)
    assert scaled_learning_rate(0.5, "none", 4096) == 0.5


def test_schedule_warmup_then_cosine():
    peak, total, warmup = 24.0, 1000, 100
    assert cosine_with_warmup(0, peak, total, warmup) == 0.0  # the first step (index 0) has lr 0
    assert cosine_with_warmup(50, peak, total, warmup) == pytest.approx(12.0)
    assert cosine_with_warmup(100, peak, total, warmup) == pytest.approx(peak)
    assert cosine_with_warmup(550, peak, total, warmup) == pytest.approx(peak / 2)
    assert cosine_with_warmup(999, peak, total, warmup) == pytest.approx(
        0.5 * peak * (1 + math.cos(math.pi * 899 / 900)))
    assert cosine_with_warmup(0, peak, total, 0) == pytest.approx(peak)


def test_larc_step_follows_the_formula():
    """g <- (g + wd p) * 0.001 ||p|| / (||g|| + wd ||p|| + eps), then SGD without its weight decay;
    a parameter with a zero gradient keeps its plain SGD step."""
    torch.manual_seed(0)
    p, q = torch.randn(8, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    p.grad, q.grad = torch.randn(8, 4), torch.zeros(3)
    lr, wd = 0.5, 1e-4
    p0, q0, g0 = p.detach().clone(), q.detach().clone(), p.grad.clone()
    optimizer = LARC(torch.optim.SGD([p, q], lr=lr, momentum=0.9, weight_decay=wd))
    optimizer.step()
    rate = 0.001 * p0.norm() / (g0.norm() + wd * p0.norm() + 1e-8)
    torch.testing.assert_close(p.detach(), p0 - lr * (g0 + wd * p0) * rate)
    torch.testing.assert_close(q.detach(), q0)  # zero gradient, and no weight decay inside LARC's step
    assert optimizer.param_groups[0]["weight_decay"] == wd  # restored after the step
    assert set(optimizer.state_dict()) == {"state", "param_groups"}  # the wrapped optimiser's format
