"""Views: y = J_y(I), x = D(J_x(y)) op by op against torchvision; the action a = (J_x^{-1}, D), decoded
here from its documented column layout, takes the pre-destructive source back to y; the MRR's candidates
satisfy the same relation."""
import math
from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import engine.views as V
from engine.config import ViewConfig, strong_jitter
from engine.views import (ViewParams, action_from_params, apply_destructive, apply_jitter, identity_action,
                          make_views, mrr_views, sample_source_params, sample_target_params)

# Tolerances against torchvision (float32 in [0, 1]): the blends are the same formulas (float rounding);
# the blur is two matmuls here vs torchvision's conv; the hue is the HSV hexagon in closed form vs
# torchvision's RGB -> HSV -> RGB round trip (~1e-6 per op in practice).
ATOL = 1e-4

TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
JITTER_FIELDS = ("brightness", "contrast", "saturation", "hue")


# ----------------------------------------------------------------------------------------------------
# Plain per-sample references
# ----------------------------------------------------------------------------------------------------
def tv_jitter(image, factors, order):
    """torchvision ops one at a time on image [3, H, W]; factors (b, c, s, h), order a list of op ids.
    Also returns whether any op clamped (its unclamped formula left [0, 1])."""
    y, clamped = image.clone(), False
    for op in order:
        f = float(factors[op])
        gray = TF.rgb_to_grayscale(y)
        raw = {0: f * y, 1: f * y + (1 - f) * gray.mean(), 2: f * y + (1 - f) * gray, 3: None}[op]
        if raw is not None and (raw.min() < -1e-6 or raw.max() > 1 + 1e-6):
            clamped = True
        y = TV_JITTER[op](y, f)
    return y, clamped


def params_jitter(p, i):
    """(factors, order) of sample i of a ViewParams (identity where the jitter was not applied)."""
    if not bool(p.jitter_applied[i]):
        return (1.0, 1.0, 1.0, 0.0), []
    return tuple(float(getattr(p, f)[i]) for f in JITTER_FIELDS), p.order[i].tolist()


def tv_destructive(image, blur_sigma, gray, sol, cfg):
    y = image
    if blur_sigma > 0:
        k = 2 * math.ceil(3 * blur_sigma) + 1
        y = TF.gaussian_blur(y, [k, k], [blur_sigma, blur_sigma])
    if gray:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if sol:
        y = TF.solarize(y, cfg.solarize_threshold)
    return y


def decode_action(a, cfg):
    """The action's columns, read by the layout documented in engine/views.py (written out here)."""
    a = a.tolist()
    factors = a[0:4]  # J_x^{-1}: brightness, contrast, saturation factors, hue shift
    rest = a[4:]
    if cfg.jitter_order == "random":
        ranks = rest[:4]  # step at which J_x^{-1} applies brightness, contrast, saturation, hue, / 3
        order = sorted(range(4), key=lambda op: ranks[op])
        assert sorted(round(r * 3) for r in ranks) == [0, 1, 2, 3]
        rest = rest[4:]
    else:
        order = [3, 2, 1, 0]  # the reverse of the fixed brightness, contrast, saturation, hue
    blur, sigma, gray, sol = rest
    assert (blur == 1.0) == (sigma > 0)
    return factors, order, sigma, gray == 1.0, sol == 1.0


def images(b, h=20, w=24, seed=0, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    # uint8 levels plus a smooth ramp so blur and contrast have structure, rescaled to [lo, hi]
    noise = torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(b, 3, h, w)
    return lo + (hi - lo) * (0.5 * noise + 0.5 * ramp)


def hand_params(n, **kw):
    """ViewParams for n samples: no jitter, no destructive op unless given."""
    f = torch.zeros(n, dtype=torch.bool)
    p = dict(jitter_applied=f, brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n),
             hue=torch.zeros(n), order=torch.arange(4).repeat(n, 1), blur_applied=f, blur_sigma=torch.zeros(n),
             grayscale=f, solarize=f)
    for k, v in kw.items():
        p[k] = torch.as_tensor(v, dtype=p[k].dtype).expand_as(p[k]).clone()
    return ViewParams(**p)


# ----------------------------------------------------------------------------------------------------
# (a) the composition, op by op against torchvision
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("order", ["random", "fixed"])
def test_views_are_composed_as_the_method(seed, order):
    cfg = replace(strong_jitter(), jitter_order=order, blur_p=0.5, grayscale_p=0.4, solarize_p=0.4)
    B = 12
    x_in = images(B, 17, 23, seed=seed)
    src, tgt, action, sp, tp = make_views(x_in, cfg, torch.Generator().manual_seed(seed))
    assert src.shape == tgt.shape == x_in.shape
    assert action.shape == (B, cfg.action_dim) and action.dtype == torch.float32
    assert sp.jitter_applied.any() and not sp.jitter_applied.all()  # p = 0.8: both cases occur
    for i in range(B):
        y_ref, _ = tv_jitter(x_in[i], *params_jitter(tp, i))
        z_ref, _ = tv_jitter(y_ref, *params_jitter(sp, i))
        x_ref = tv_destructive(z_ref, float(sp.blur_sigma[i]), bool(sp.grayscale[i]), bool(sp.solarize[i]), cfg)
        torch.testing.assert_close(tgt[i], y_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(src[i], x_ref, atol=ATOL, rtol=0)
    # the target never gets a destructive op
    assert not (tp.blur_applied | tp.grayscale | tp.solarize).any()
    # the same generator seed gives the same views
    src2, tgt2, action2, _, _ = make_views(x_in, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(src, src2) and torch.equal(tgt, tgt2) and torch.equal(action, action2)


def test_each_op_matches_torchvision():
    x = images(4, 16, 16, seed=3)
    cases = {0: [0.6, 1.0, 1.4, 1.8], 1: [0.2, 0.7, 1.3, 1.8], 2: [0.0, 0.5, 1.2, 1.7], 3: [-0.5, -0.07, 0.03, 0.45]}
    for op, values in cases.items():
        order = torch.tensor([[op] + [o for o in range(4) if o != op]] * 4)
        p = hand_params(4, jitter_applied=True, order=order, **{JITTER_FIELDS[op]: values})
        out = apply_jitter(x, p)
        for i in range(4):
            torch.testing.assert_close(out[i], TV_JITTER[op](x[i], values[i]), atol=ATOL, rtol=0)
    cfg = ViewConfig()
    p = hand_params(4, blur_applied=[True, True, False, False], blur_sigma=[0.3, 2.0, 0.0, 0.0],
                    grayscale=[False, True, True, False], solarize=[False, False, True, True])
    out = apply_destructive(x, p, cfg)
    for i in range(4):
        ref = tv_destructive(x[i], float(p.blur_sigma[i]), bool(p.grayscale[i]), bool(p.solarize[i]), cfg)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_order_matters_and_is_the_recorded_one():
    # brightness 1.4 clips the pixels above 1/1.4; contrast 0.5 first pulls them towards the mean
    x = torch.linspace(0.1, 0.95, 3 * 12 * 12).view(1, 3, 12, 12).expand(2, -1, -1, -1).contiguous()
    p = hand_params(2, jitter_applied=True, brightness=1.4, contrast=0.5,
                    order=torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]))
    out = apply_jitter(x, p)
    assert (out[0] - out[1]).abs().max() > 0.05
    torch.testing.assert_close(out[0], TF.adjust_contrast(TF.adjust_brightness(x[0], 1.4), 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], TF.adjust_brightness(TF.adjust_contrast(x[0], 0.5), 1.4), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# (b) the action determines y from x
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["random", "fixed"])
def test_action_takes_the_source_back_to_the_target(order):
    # mid-range images so that most samples' source jitter does not clamp (the inverse is exact there)
    cfg = replace(ViewConfig(), jitter_order=order, blur_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    B = 48
    x_in = images(B, 12, 14, seed=5, lo=0.3, hi=0.6)
    src, tgt, action, sp, _ = make_views(x_in, cfg, torch.Generator().manual_seed(5))
    exact = 0
    for i in range(B):
        factors, inv_order, *_ = decode_action(action[i], cfg)
        _, clamped = tv_jitter(tgt[i], *params_jitter(sp, i))
        y_hat, _ = tv_jitter(src[i], factors, inv_order)  # x = z here (no destructive op)
        if not clamped:
            torch.testing.assert_close(y_hat, tgt[i], atol=ATOL, rtol=0)
            exact += 1
    assert exact > B // 2
    # equal source + equal action -> equal target: two samples reaching the same x with the same action
    # from different images and target jitters (I2 = y1 with no target jitter) have the same target
    tp2 = hand_params(B)
    src2 = apply_destructive(apply_jitter(apply_jitter(tgt, tp2), sp), sp, cfg)
    torch.testing.assert_close(src2, src, atol=0, rtol=0)
    torch.testing.assert_close(apply_jitter(tgt, tp2), tgt, atol=0, rtol=0)


def test_order_is_in_the_action():
    # the same factors in two orders give two different sources and two different actions; each action's
    # decoded inverse recovers the target
    cfg = ViewConfig()
    y = images(2, 10, 10, seed=7, lo=0.35, hi=0.55)
    p = hand_params(2, jitter_applied=True, brightness=1.3, contrast=0.7, saturation=1.2, hue=0.08,
                    order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    x = apply_jitter(y, p)
    a = action_from_params(p, cfg)
    assert (x[0] - x[1]).abs().max() > 1e-3 and not torch.equal(a[0], a[1])
    for i in range(2):
        factors, inv_order, *_ = decode_action(a[i], cfg)
        assert inv_order == p.order[i].flip(0).tolist()
        torch.testing.assert_close(torch.tensor(factors), torch.tensor([1 / 1.3, 1 / 0.7, 1 / 1.2, -0.08]))
        torch.testing.assert_close(tv_jitter(x[i], factors, inv_order)[0], y[i], atol=ATOL, rtol=0)


def test_destructive_part_of_the_action():
    cfg = ViewConfig()
    p = hand_params(3, blur_applied=[True, False, False], blur_sigma=[1.5, 0.0, 0.0], grayscale=[False, True, False],
                    solarize=[False, True, True])
    for i, a in enumerate(action_from_params(p, cfg)):
        _, _, sigma, gray, sol = decode_action(a, cfg)
        assert sigma == pytest.approx(float(p.blur_sigma[i])) and gray == bool(p.grayscale[i])
        assert sol == bool(p.solarize[i])


@pytest.mark.parametrize("order", ["random", "fixed"])
def test_identity(order):
    cfg = ViewConfig(jitter_order=order)
    ident = identity_action(5, cfg)
    assert ident.shape == (5, cfg.action_dim) and ident.dtype == torch.float32
    factors, inv_order, sigma, gray, sol = decode_action(ident[0], cfg)
    assert factors == [1.0, 1.0, 1.0, 0.0] and sigma == 0.0 and not gray and not sol
    # the action of no jitter (not applied, or applied with identity factors in the canonical order) is it
    assert torch.equal(action_from_params(hand_params(5), cfg), ident)
    assert torch.equal(action_from_params(hand_params(5, jitter_applied=True), cfg), ident)
    # and decoding it changes nothing
    x = images(1, 8, 8)
    torch.testing.assert_close(tv_jitter(x[0], factors, inv_order)[0], x[0], atol=ATOL, rtol=0)
    # make_views' samples without a source jitter or destructive op carry exactly this action
    cfg0 = replace(cfg, jitter_p=0.0, blur_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    _, _, a, _, _ = make_views(images(4), cfg0, torch.Generator().manual_seed(0))
    assert torch.equal(a, identity_action(4, cfg0))


def test_action_dim_is_the_config_one():
    assert ViewConfig(jitter_order="random").action_dim == 12
    assert ViewConfig(jitter_order="fixed").action_dim == 8
    assert len(ViewConfig().action_columns) == ViewConfig().action_dim


# ----------------------------------------------------------------------------------------------------
# (c) the MRR's views
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["random", "fixed"])
def test_mrr_candidates_differ_and_each_satisfies_the_relation(order):
    # no destructive op: x is the pre-destructive source z, and y_k = clamp(J_k^{-1}(z)) is exactly the
    # action's decoded inverse applied to x (clamping included, as every op clamps)
    cfg = replace(ViewConfig(), jitter_order=order, blur_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    K = 16
    img = images(1, 10, 12, seed=8)
    x, ys, actions = mrr_views(img, cfg, K, torch.Generator().manual_seed(8))
    assert x.shape == img.shape and ys.shape == (K, 3, 10, 12) and actions.shape == (K, cfg.action_dim)
    flat = ys.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(K) * 1e9
    assert dist.min() > 1e-3  # no two candidates are the same image
    for k in range(K):
        factors, inv_order, *_ = decode_action(actions[k], cfg)
        torch.testing.assert_close(tv_jitter(x[0], factors, inv_order)[0], ys[k], atol=ATOL, rtol=0)


def test_mrr_relation_with_destructive_ops():
    # destructive ops on: training would produce x from y_k by J_k (the inverse of the decoded action's
    # jitter) then D (the action's flags); check it where J_k does not clamp
    cfg = replace(ViewConfig(), blur_p=1.0, grayscale_p=1.0, solarize_p=1.0)
    K = 12
    img = images(1, 10, 12, seed=9, lo=0.35, hi=0.55)
    x, ys, actions = mrr_views(img, cfg, K, torch.Generator().manual_seed(9))
    checked = 0
    for k in range(K):
        factors, inv_order, sigma, gray, sol = decode_action(actions[k], cfg)
        assert sigma > 0 and gray and sol
        forward = (1 / factors[0], 1 / factors[1], 1 / factors[2], -factors[3])
        z, clamped = tv_jitter(ys[k], forward, inv_order[::-1])
        if not clamped:
            torch.testing.assert_close(tv_destructive(z, sigma, gray, sol, cfg), x[0], atol=ATOL, rtol=0)
            checked += 1
    assert checked > K // 2


def test_mrr_views_errors():
    with pytest.raises(ValueError, match="one image"):
        mrr_views(images(2), ViewConfig(), 4)
    with pytest.raises(ValueError, match="jitter strength"):
        mrr_views(images(1), ViewConfig(brightness=0, contrast=0, saturation=0, hue=0), 4)


# ----------------------------------------------------------------------------------------------------
# (d) sampling, paths, inputs
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
        # all 24 orders about equally often where applied; the canonical one where not
        counts = torch.unique(p.order[on], dim=0, return_counts=True)[1]
        assert len(counts) == 24 and counts.min() > 0.8 * on.sum() / 24 and counts.max() < 1.2 * on.sum() / 24
        assert torch.equal(p.order[~on], torch.arange(4).expand(int((~on).sum()), 4))
    assert abs(sp.blur_applied.float().mean().item() - cfg.blur_p) < 0.02
    assert abs(sp.grayscale.float().mean().item() - cfg.grayscale_p) < 0.02
    assert abs(sp.solarize.float().mean().item() - cfg.solarize_p) < 0.02
    s = sp.blur_sigma[sp.blur_applied]
    assert s.min() >= cfg.blur_sigma[0] and s.max() <= cfg.blur_sigma[1]
    assert torch.all(sp.blur_sigma[~sp.blur_applied] == 0)
    assert not (tp.blur_applied | tp.grayscale | tp.solarize).any()


def test_cpu_subset_path_equals_the_whole_batch_path(monkeypatch):
    # on the CPU ops run on the samples that need them; on an accelerator on the whole batch + select
    cfg = replace(strong_jitter(), blur_p=0.5, grayscale_p=0.5, solarize_p=0.5)
    x = images(16, 13, 15, seed=11)
    a = make_views(x, cfg, torch.Generator().manual_seed(11))
    monkeypatch.setattr(V, "_compact", lambda device: False)
    b = make_views(x, cfg, torch.Generator().manual_seed(11))
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=0)


def test_inputs_are_kept_and_checked():
    x = images(6)
    x0 = x.clone()
    make_views(x, replace(strong_jitter(), blur_p=0.5, grayscale_p=0.5, solarize_p=0.5),
               torch.Generator().manual_seed(0))
    assert torch.equal(x, x0)
    x8 = (x * 255).round().to(torch.uint8)
    p = sample_target_params(ViewConfig(), 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_jitter(x8, p), apply_jitter(x8.float() / 255, p))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        make_views(torch.rand(2, 1, 8, 8), ViewConfig())
