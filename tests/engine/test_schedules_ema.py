"""Schedules against their closed forms; the EMA update against a plain per-parameter loop."""
import math

import pytest
import torch

from engine.ema import update_target
from engine.schedules import ema_momentum_at, lr_at, weight_decay_at


def test_lr_warmup_then_cosine():
    total, warmup = 100, 10
    assert lr_at(0, total, warmup, 2e-4, 1e-3, 1e-6) == pytest.approx(2e-4)
    assert lr_at(5, total, warmup, 2e-4, 1e-3, 1e-6) == pytest.approx(2e-4 + 0.5 * 8e-4)
    assert lr_at(10, total, warmup, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-3)
    # halfway through the cosine: the midpoint of peak and final
    assert lr_at(55, total, warmup, 2e-4, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert lr_at(100, total, warmup, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-6)


def test_weight_decay_cosine_and_ema_linear():
    assert weight_decay_at(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert weight_decay_at(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert weight_decay_at(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert ema_momentum_at(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum_at(25, 100, 0.996, 1.0) == pytest.approx(0.997)
    assert ema_momentum_at(200, 100, 0.996, 1.0) == pytest.approx(1.0)


def test_ema_update_matches_plain_loop():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    target = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    expected = {}
    m = 0.9
    for (name, t), o in zip(target.named_parameters(), online.parameters()):
        expected[name] = [m * t[i].item() + (1 - m) * o[i].item() for i in range(t.shape[0])] if t.ndim == 1 else \
            [[m * t[i, j].item() + (1 - m) * o[i, j].item() for j in range(t.shape[1])] for i in range(t.shape[0])]
    update_target(target, online, m)
    for name, t in target.named_parameters():
        torch.testing.assert_close(t, torch.tensor(expected[name]), atol=1e-6, rtol=1e-6)


def test_ema_refuses_mismatched_modules():
    with pytest.raises(ValueError, match="differ"):
        update_target(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.5)
