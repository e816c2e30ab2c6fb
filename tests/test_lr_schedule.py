"""The learning-rate schedules (x3d_exp.engine.build.lr_per_step) step by step, and the rate the optimizer applies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.cli_helpers import compose_config
from x3d_exp.engine.build import build_optimizer, lr_per_step

STEPS = 5  # per epoch


def test_cosine_warmup_rises_linearly_from_a_tenth_then_falls_by_half_a_cosine_to_a_thousandth():
    cfg = compose_config("trainer.epochs=4", "schedule.warmup_epochs=1")
    rates = lr_per_step(cfg, STEPS, 0.1)
    assert len(rates) == 4 * STEPS
    # Warmup: steps 0-4 from lr/10 towards lr.
    assert rates[:STEPS] == pytest.approx([0.01 + 0.09 * step / STEPS for step in range(STEPS)])
    # Then cosine from lr (step 5) over the 15 remaining steps towards lr/1000, never reaching it.
    for step in range(STEPS, 4 * STEPS):
        progress = (step - STEPS) / (3 * STEPS)
        assert rates[step] == pytest.approx(1e-4 + (0.1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert rates[STEPS] == pytest.approx(0.1) and max(rates) == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates[STEPS:], rates[STEPS + 1:])) and rates[-1] > 1e-4


def test_cosine_warmup_takes_its_start_and_end_rates_and_may_skip_the_warmup():
    cfg = compose_config("trainer.epochs=2", "schedule.warmup_epochs=0.4", "schedule.warmup_start_lr=0.0",
                         "schedule.end_lr=0.02")
    rates = lr_per_step(cfg, STEPS, 0.1)
    assert rates[:3] == pytest.approx([0.0, 0.05, 0.1])  # 0.4 epochs of 5 steps: 2 warmup steps
    assert rates[-1] == pytest.approx(0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    no_warmup = lr_per_step(compose_config("trainer.epochs=2", "schedule.warmup_epochs=0"), STEPS, 0.1)
    assert no_warmup[0] == pytest.approx(0.1)


def test_multistep_divides_the_rate_by_ten_at_each_milestone_epoch():
    cfg = compose_config("schedule=multistep", "schedule.milestones=[2,3]", "trainer.epochs=4")
    rates = lr_per_step(cfg, STEPS, 0.1)
    assert rates == pytest.approx([0.1] * 10 + [0.01] * 5 + [0.001] * 5)


def test_multistep_after_a_warmup_and_with_its_own_factor():
    cfg = compose_config("schedule=multistep", "schedule.milestones=[2]", "schedule.gamma=0.5",
                         "schedule.warmup_epochs=1", "trainer.epochs=3")
    rates = lr_per_step(cfg, STEPS, 0.2)
    assert rates[:STEPS] == pytest.approx([0.02 + 0.18 * step / STEPS for step in range(STEPS)])
    assert rates[STEPS:] == pytest.approx([0.2] * 5 + [0.1] * 5)


def test_the_optimizer_applies_the_scheduled_rate_at_every_step():
    """Plain SGD (no momentum, no decay) on a linear layer: each step moves the weight by exactly rate x gradient,
    across the multistep drop, and the rates follow the linear scaling rule."""
    import mindspore as ms
    from mindspore import nn

    cfg = compose_config("schedule=multistep", "schedule.milestones=[1]", "trainer.epochs=2", "optim.lr=0.4",
                         "optim.momentum=0", "optim.nesterov=false", "optim.weight_decay=0", "optim.scale_lr=true",
                         "optim.base_batch_size=64", "data.batch_size=16")
    network = nn.Dense(3, 1)  # a weight and a bias: both parameter groups (decay and no decay) are filled
    optimizer, rates = build_optimizer(cfg, network, steps_per_epoch=2, world_size=2)
    # 0.4 x (16 x 2 ranks) / 64 = 0.2, then x0.1 from epoch 1.
    assert rates == pytest.approx([0.2, 0.2, 0.02, 0.02])
    step = nn.TrainOneStepCell(nn.WithLossCell(network, nn.MSELoss()), optimizer)
    x = ms.Tensor(np.array([[1.0, 2.0, -1.0]], np.float32))
    y = ms.Tensor(np.array([[0.5]], np.float32))
    for rate in rates:
        weight, bias = network.weight.asnumpy().copy(), network.bias.asnumpy().copy()
        residual = float(weight @ x.asnumpy()[0] + bias[0]) - 0.5
        step(x, y)
        # d/dw and d/db of (w.x + b - y)^2
        assert network.weight.asnumpy() == pytest.approx(weight - rate * 2 * residual * x.asnumpy(), rel=1e-5, abs=1e-7)
        assert network.bias.asnumpy() == pytest.approx(bias - rate * 2 * residual, rel=1e-5, abs=1e-7)
