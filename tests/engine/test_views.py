"""Views: recorded params reproduce the pixels, match torchvision op by op, follow the config's
probabilities, and give the action PAPER.md describes."""
import math
from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from engine.config import ViewConfig, strong_jitter
from engine.views import (ViewParams, action_from_params, apply_view, make_views, null_action,
                          sample_source_params, sample_target_params)

# Tolerances against the torchvision reference (float32 images in [0, 1]):
#  - brightness / contrast / saturation / grayscale / solarize: the same formulas, float rounding only;
#  - blur: separable conv here vs torchvision's 2-D kernel, same kernel size and reflect padding;
#  - hue: RGB -> HSV -> RGB written differently (closed-form hexagon vs torchvision's sextant table);
#    ~1e-6 in practice, 1e-4 leaves room for pixels exactly on a sextant boundary.
ATOL_PLAIN = 1e-5
ATOL_WITH_HUE = 1e-4

TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
JITTER_FIELDS = ("brightness", "contrast", "saturation", "hue")


def reference_view(image, params, i, cfg):
    """torchvision.transforms.v2.functional applied one op at a time to image [3, H, W] (sample i)."""
    y = image.clone()
    if bool(params.jitter_applied[i]):
        for op in params.order[i].tolist():
            y = TV_JITTER[op](y, float(getattr(params, JITTER_FIELDS[op])[i]))
    if bool(params.blur_applied[i]):
        sigma = float(params.blur_sigma[i])
        k = 2 * math.ceil(3 * sigma) + 1
        y = TF.gaussian_blur(y, [k, k], [sigma, sigma])
    if bool(params.grayscale[i]):
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if bool(params.solarize[i]):
        y = TF.solarize(y, cfg.solarize_threshold)
    return y


def hand_params(n=1, **kw):
    """ViewParams for n samples: identity unless given (values broadcast to n)."""
    p = ViewParams.identity(n)
    for name, value in kw.items():
        ref = getattr(p, name)
        t = torch.as_tensor(value, dtype=ref.dtype)
        setattr(p, name, t.expand_as(ref).clone() if t.dim() < ref.dim() or t.shape[0] != n else t.clone())
    return p


def images(b, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # as the loader makes them: uint8 pixels / 255, plus a smooth ramp so blur and contrast have structure
    noise = torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(b, 3, h, w)
    return (0.5 * noise + 0.5 * ramp).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# (a) round trip
# ----------------------------------------------------------------------------------------------------
def test_round_trip_reproduces_pixels():
    cfg = ViewConfig()
    x = images(16)
    src, tgt, action, sp, tp = make_views(x, cfg, torch.Generator().manual_seed(3))
    assert src.shape == tgt.shape == x.shape and action.shape == (16, cfg.action_dim)
    assert torch.equal(apply_view(x, sp, cfg), src)
    assert torch.equal(apply_view(x, tp, cfg), tgt)
    # a subset of the params applied to the same subset of images gives the same pixels
    idx = torch.tensor([1, 5, 7])
    assert torch.allclose(apply_view(x[idx], sp.index(idx), cfg), src[idx], atol=1e-6)
    # the same generator seed gives the same views
    src2, tgt2, action2, _, _ = make_views(x, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(src, src2) and torch.equal(tgt, tgt2) and torch.equal(action, action2)
    assert src.min() >= 0 and src.max() <= 1


def test_identity_params_leave_images_unchanged():
    x = images(4)
    assert torch.equal(apply_view(x, ViewParams.identity(4), ViewConfig()), x)
    # jitter_applied False: drawn factors are 1 and the order is ignored
    p = hand_params(4, order=torch.tensor([[3, 2, 1, 0]] * 4))
    assert torch.equal(apply_view(x, p, ViewConfig()), x)


def test_uint8_input_is_converted():
    x = images(3)
    x8 = (x * 255).round().to(torch.uint8)
    p = sample_source_params(ViewConfig(), 3, torch.Generator().manual_seed(0))
    out = apply_view(x8, p, ViewConfig())
    assert out.dtype == torch.float32
    assert torch.allclose(out, apply_view(x8.float() / 255, p, ViewConfig()))


# ----------------------------------------------------------------------------------------------------
# (b) an independent reference: torchvision's functional ops one by one, in the recorded order
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchvision_reference(seed):
    # every transform on (p=1 for jitter and blur, 0.5 for the rest), strong ranges
    cfg = replace(strong_jitter(), jitter_p=1.0, blur_p=1.0, grayscale_p=0.5, solarize_p=0.5)
    B = 8
    x = images(B, 17, 23, seed=seed)
    p = sample_source_params(cfg, B, torch.Generator().manual_seed(seed))
    out = apply_view(x, p, cfg)
    for i in range(B):
        ref = reference_view(x[i], p, i, cfg)
        torch.testing.assert_close(out[i], ref, atol=ATOL_WITH_HUE, rtol=0)


@pytest.mark.parametrize("op", range(4))
def test_each_jitter_op_matches_torchvision(op):
    x = images(3, 16, 16, seed=op)
    values = {0: [0.6, 1.0, 1.4], 1: [0.6, 1.0, 1.4], 2: [0.0, 0.8, 1.7], 3: [-0.5, 0.03, 0.45]}[op]
    kw = {JITTER_FIELDS[op]: torch.tensor(values)}
    order = torch.tensor([[op] + [o for o in range(4) if o != op]] * 3)
    p = hand_params(3, jitter_applied=torch.ones(3, dtype=torch.bool), order=order, **kw)
    out = apply_view(x, p, ViewConfig())
    for i in range(3):
        ref = TV_JITTER[op](x[i], values[i])
        torch.testing.assert_close(out[i], ref, atol=ATOL_WITH_HUE if op == 3 else ATOL_PLAIN, rtol=0)


def test_destructive_ops_match_torchvision():
    cfg = ViewConfig()
    x = images(4, 15, 19)
    p = hand_params(4, blur_applied=torch.tensor([True, True, False, False]),
                    blur_sigma=torch.tensor([0.3, 1.7, 0.0, 0.0]),
                    grayscale=torch.tensor([False, True, True, False]),
                    solarize=torch.tensor([False, False, True, True]))
    out = apply_view(x, p, cfg)
    for i in range(4):
        torch.testing.assert_close(out[i], reference_view(x[i], p, i, cfg), atol=ATOL_PLAIN, rtol=0)


def test_target_params_use_jitter_only_and_match_reference():
    cfg = ViewConfig()
    x = images(6)
    p = sample_target_params(cfg, 6, torch.Generator().manual_seed(1))
    out = apply_view(x, p, cfg)
    for i in range(6):
        torch.testing.assert_close(out[i], reference_view(x[i], p, i, cfg), atol=ATOL_WITH_HUE, rtol=0)


# ----------------------------------------------------------------------------------------------------
# (c) statistics over many draws
# ----------------------------------------------------------------------------------------------------
def test_sampling_statistics_follow_config():
    cfg = ViewConfig()
    n = 20000
    g = torch.Generator().manual_seed(0)
    sp, tp = sample_source_params(cfg, n, g), sample_target_params(cfg, n, g)
    for p in (sp, tp):
        on = p.jitter_applied
        assert abs(on.float().mean().item() - cfg.jitter_p) < 0.02
        for name, v in (("brightness", cfg.brightness), ("contrast", cfg.contrast), ("saturation", cfg.saturation)):
            f = getattr(p, name)
            assert f[on].min() >= 1 - v and f[on].max() <= 1 + v
            assert f[on].min() < 1 - 0.9 * v and f[on].max() > 1 + 0.9 * v  # the range is used
            assert torch.all(f[~on] == 1.0)
        assert p.hue[on].abs().max() <= cfg.hue and p.hue[on].abs().max() > 0.9 * cfg.hue
        assert torch.all(p.hue[~on] == 0.0)
        # every order row is a permutation of 0..3, and all 24 permutations occur about equally often
        assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
        counts = torch.unique(p.order, dim=0, return_counts=True)[1]
        assert len(counts) == 24 and counts.min() > 0.8 * n / 24 and counts.max() < 1.2 * n / 24
    # source: destructive transforms at the config's rates, sigma in range
    assert abs(sp.blur_applied.float().mean().item() - cfg.blur_p) < 0.02
    assert abs(sp.grayscale.float().mean().item() - cfg.grayscale_p) < 0.02
    assert abs(sp.solarize.float().mean().item() - cfg.solarize_p) < 0.02
    s = sp.blur_sigma[sp.blur_applied]
    assert s.min() >= cfg.blur_sigma[0] and s.max() <= cfg.blur_sigma[1]
    assert torch.all(sp.blur_sigma[~sp.blur_applied] == 0)
    # the two views are drawn independently
    assert not torch.equal(sp.brightness, tp.brightness)
    # target: never destructive
    assert not tp.is_destructive().any()


def test_fixed_order_and_zero_probabilities():
    cfg = ViewConfig(jitter_order="fixed", jitter_p=0.0, blur_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    p = sample_source_params(cfg, 100, torch.Generator().manual_seed(0))
    assert torch.equal(p.order, torch.arange(4).expand(100, 4))
    assert not p.jitter_applied.any() and not p.is_destructive().any()
    x = images(100, 8, 8)
    assert torch.equal(apply_view(x, p, cfg), x)


def test_params_move_and_combine():
    cfg = ViewConfig()
    p = sample_source_params(cfg, 5, torch.Generator().manual_seed(0), device="cpu")
    assert p.batch_size == len(p) == 5 and p.to("cpu").device.type == "cpu"
    assert p.index(2).batch_size == 1 and torch.equal(p.index(2).order, p.order[2:3])
    both = ViewParams.cat([p, p.index(slice(0, 2))])
    assert both.batch_size == 7 and torch.equal(both.brightness[5:], p.brightness[:2])
    rep = p.index(0).repeat_interleave(3)
    assert rep.batch_size == 3 and torch.all(rep.hue == p.hue[0])


# ----------------------------------------------------------------------------------------------------
# (d) the action
# ----------------------------------------------------------------------------------------------------
def test_action_zero_for_equal_params():
    cfg = ViewConfig()
    tp = sample_target_params(cfg, 32, torch.Generator().manual_seed(0))
    a = action_from_params(tp, tp)
    assert a.shape == (32, cfg.action_dim) and a.dtype == torch.float32
    assert torch.all(a == 0)
    assert torch.equal(null_action(4), torch.zeros(4, cfg.action_dim))


def test_action_values_from_hand_built_params():
    source = hand_params(2, jitter_applied=torch.tensor([True, False]),
                         brightness=torch.tensor([1.2, 1.0]), contrast=torch.tensor([0.7, 1.0]),
                         saturation=torch.tensor([1.1, 1.0]), hue=torch.tensor([0.05, 0.0]),
                         blur_applied=torch.tensor([True, False]), blur_sigma=torch.tensor([1.0, 0.0]),
                         grayscale=torch.tensor([False, True]), solarize=torch.tensor([True, False]))
    target = hand_params(2, jitter_applied=torch.tensor([True, True]),
                         brightness=torch.tensor([0.9, 1.3]), contrast=torch.tensor([0.7, 0.8]),
                         saturation=torch.tensor([1.0, 1.2]), hue=torch.tensor([-0.05, 0.1]))
    a = action_from_params(source, target)
    expected = torch.tensor([
        # b_y - b_x, c_y - c_x, s_y - s_x, h_y - h_x, blur_x, gray_x, solarize_x
        [0.9 - 1.2, 0.0, 1.0 - 1.1, -0.1, 1.0, 0.0, 1.0],
        [1.3 - 1.0, 0.8 - 1.0, 1.2 - 1.0, 0.1, 0.0, 1.0, 0.0],
    ])
    torch.testing.assert_close(a, expected, atol=1e-6, rtol=0)
    # swapping roles flips the jitter signs (the flags are always the source's)
    b = action_from_params(target, source)
    torch.testing.assert_close(b[:, :4], -a[:, :4])
    assert torch.all(b[:, 4:] == 0)


def test_make_views_action_matches_params():
    x = images(8)
    _, _, action, sp, tp = make_views(x, ViewConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(action, action_from_params(sp, tp))
    assert not tp.is_destructive().any()


# ----------------------------------------------------------------------------------------------------
# (e) the order of the jitter ops matters, and the recorded one is the one applied
# ----------------------------------------------------------------------------------------------------
def test_order_matters_and_is_reproduced():
    # without clipping the two blends commute; brightness 1.4 clips the pixels above 1/1.4, contrast 0.5
    # first pulls them towards the mean, so fewer clip
    x = torch.linspace(0.1, 0.95, 3 * 12 * 12).view(1, 3, 12, 12).expand(2, -1, -1, -1).contiguous()
    orders = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])  # brightness first / contrast first
    p = hand_params(2, jitter_applied=torch.ones(2, dtype=torch.bool), brightness=1.4, contrast=0.5, order=orders)
    out = apply_view(x, p, ViewConfig())
    assert (out[0] - out[1]).abs().max() > 0.05
    b_then_c = TF.adjust_contrast(TF.adjust_brightness(x[0], 1.4), 0.5)
    c_then_b = TF.adjust_brightness(TF.adjust_contrast(x[0], 0.5), 1.4)
    torch.testing.assert_close(out[0], b_then_c, atol=ATOL_PLAIN, rtol=0)
    torch.testing.assert_close(out[1], c_then_b, atol=ATOL_PLAIN, rtol=0)


def test_hue_and_contrast_order():
    # hue changes the luma, so contrast (blend with mean luma) before or after hue differs
    # (for an affine contrast the only difference is the mean luma, so use a mostly red image)
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    x = x * torch.tensor([0.3, 0.2, 0.2]).view(3, 1, 1) + torch.tensor([0.7, 0.0, 0.0]).view(3, 1, 1)
    x = x.expand(2, -1, -1, -1).contiguous()
    orders = torch.tensor([[3, 1, 0, 2], [1, 3, 0, 2]])
    p = hand_params(2, jitter_applied=torch.ones(2, dtype=torch.bool), contrast=0.3, hue=0.4, order=orders)
    out = apply_view(x, p, ViewConfig())
    assert (out[0] - out[1]).abs().max() > 0.01
    for i in range(2):
        torch.testing.assert_close(out[i], reference_view(x[i], p, i, ViewConfig()), atol=ATOL_WITH_HUE, rtol=0)
