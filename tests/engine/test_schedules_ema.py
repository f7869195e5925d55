"""Schedules against their closed forms; the EMA update against a plain per-parameter loop."""
import math

import pytest
import torch

from engine.ema import TargetEncoder
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


def test_ema_through_the_real_target_encoder_matches_float64_formula():
    """TargetEncoder.update (the flat-buffer path training uses) against m*t + (1-m)*o in float64,
    every parameter, twice (so a pairing or a buffer that goes stale is caught too)."""
    from engine.models import Encoder
    from tests.helpers import tiny_cfg

    torch.manual_seed(0)
    online = Encoder(tiny_cfg())
    target = TargetEncoder(online)
    for m in (0.9, 0.75):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # the optimizer moved the online encoder
        before = {n: p.double().clone() for n, p in target.module.named_parameters()}
        online_now = {n: p.double().clone() for n, p in online.named_parameters()}
        target.update(m)
        for n, p in target.module.named_parameters():
            expected = m * before[n] + (1 - m) * online_now[n]
            torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6, msg=n)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in target.parameters())
    assert not target.module.training


def test_target_encoder_is_a_separate_copy():
    from engine.models import Encoder
    from tests.helpers import tiny_cfg

    online = Encoder(tiny_cfg())
    target = TargetEncoder(online)
    for (n1, p1), (n2, p2) in zip(online.named_parameters(), target.module.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert target.flat.numel() == sum(p.numel() for p in online.parameters())


def test_ema_refuses_mismatched_modules():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)

    target = TargetEncoder(Two())
    target._online_params = target._online_params[:1]  # noqa: the pairing must cover every parameter
    with pytest.raises(ValueError):
        target.update(0.5)
