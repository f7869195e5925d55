"""Masks: targets are unions of blocks of the drawn sizes, the context one square block minus the targets
(or the complement), ragged, every position reachable, redraws keep the packed masks consistent; checked
against plain loops and an independent Monte Carlo of the rule."""
import math
import random

import pytest
import torch

from engine.config import ConfigError, MaskConfig
from engine.masks import MaskSampler


def dense_from_packed(idx, counts, n):
    """Plain loop: packed indices + per-sample counts -> [B, N] bool."""
    out = torch.zeros(len(counts), n, dtype=torch.bool)
    start = 0
    for b, c in enumerate(counts):
        for i in idx[start:start + c].tolist():
            out[b, i] = True
        start += c
    return out


def box_cells(top, left, h, w, W):
    return {(r * W + c) for r in range(top, top + h) for c in range(left, left + w)}


def reference_context_fraction(H, W, cfg, n, seed):
    """The rule, written plainly per sample with Python's random (an independent Monte Carlo)."""
    rng = random.Random(seed)

    def size(lo, hi, alo, ahi):
        keep = int(rng.uniform(lo, hi) * H * W)
        ar = math.exp(rng.uniform(math.log(alo), math.log(ahi)))
        h = min(max(round(math.sqrt(keep * ar)), 1), max(H - 1, 1))
        w = min(max(round(math.sqrt(keep / ar)), 1), max(W - 1, 1))
        return h, w

    total = 0
    for _ in range(n):
        while True:
            target = set()
            for _ in range(cfg.num_blocks):
                h, w = size(*cfg.block_scale, *cfg.aspect_ratio)
                target |= box_cells(rng.randrange(H - h + 1), rng.randrange(W - w + 1), h, w, W)
            h, w = size(*cfg.context_scale, 1.0, 1.0)
            context = box_cells(rng.randrange(H - h + 1), rng.randrange(W - w + 1), h, w, W) - target
            if len(context) >= cfg.min_context:
                break
        total += len(context)
    return total / (n * H * W)


def test_block_context_is_one_square_block_minus_the_targets():
    cfg = MaskConfig()
    H = W = 14
    s = MaskSampler(cfg, H, W)
    d = s.draw(256, torch.Generator().manual_seed(0))
    for b in range(256):
        # targets: exactly the union of the drawn blocks, each of the configured scale and aspect
        union = set()
        for top, left, h, w in d.target_blocks[b].tolist():
            assert 0 <= top <= H - h and 0 <= left <= W - w
            keep = h * w / (H * W)
            assert 0.10 <= keep <= 0.22, (h, w)  # 15-20% of 196 after rounding h and w
            assert 0.75 / 1.5 <= h / w <= 1.5 * 1.5
            union |= box_cells(top, left, h, w, W)
        assert set(d.target[b].nonzero().flatten().tolist()) == union
        # context: the square block (13 x 13 for scale 0.85-1.0 on 14 x 14) minus the targets
        top, left, h, w = d.context_block[b].tolist()
        assert h == w == 13 and 0 <= top <= 1 and 0 <= left <= 1
        assert set(d.context[b].nonzero().flatten().tolist()) == box_cells(top, left, h, w, W) - union


def test_sample_packs_the_draw_ragged_and_disjoint():
    s = MaskSampler(MaskConfig(), 14, 14)
    d = s.draw(64, torch.Generator().manual_seed(1))
    m = s.sample(64, torch.Generator().manual_seed(1))
    tgt = dense_from_packed(m.target_idx, m.target_counts, 196)
    ctx = dense_from_packed(m.context_idx, m.context_counts, 196)
    assert torch.equal(tgt, d.target) and torch.equal(ctx, d.context)
    assert not (tgt & ctx).any()
    assert m.context_counts == ctx.sum(1).tolist() and m.target_counts == tgt.sum(1).tolist()
    assert len(set(m.context_counts)) > 5  # ragged: nothing truncated to the batch minimum
    assert min(m.context_counts) >= MaskConfig().min_context


def test_mean_context_fraction_matches_an_independent_monte_carlo():
    cfg = MaskConfig()
    m = MaskSampler(cfg, 14, 14).sample(4000, torch.Generator().manual_seed(2))
    got = sum(m.context_counts) / (4000 * 196)
    expected = reference_context_fraction(14, 14, cfg, 4000, seed=0)
    assert abs(got - expected) < 0.01, (got, expected)
    assert 0.39 < got < 0.43  # I-JEPA's context: about 41% of the grid
    comp = MaskSampler(MaskConfig(context="complement"), 14, 14).sample(4000, torch.Generator().manual_seed(2))
    assert 0.50 < sum(comp.context_counts) / (4000 * 196) < 0.55  # the full complement: about 52%


@pytest.mark.parametrize("mode", ["complement", "block"])
def test_redraws_keep_context_and_target_consistent(mode):
    # on a 4x4 grid these settings leave fewer than min_context context patches in a large share of first
    # draws, so the redraw path runs for many samples in every batch
    if mode == "complement":
        cfg = MaskConfig(block_scale=(0.3, 0.4), min_context=5, context=mode)
    else:
        cfg = MaskConfig(block_scale=(0.15, 0.25), min_context=4, context=mode)
    s = MaskSampler(cfg, 4, 4)
    first = s._draw_once(2000, torch.Generator().manual_seed(3))
    assert (first.context.sum(1) < cfg.min_context).float().mean() > 0.2
    m = s.sample(2000, torch.Generator().manual_seed(3))
    tgt = dense_from_packed(m.target_idx, m.target_counts, 16)
    ctx = dense_from_packed(m.context_idx, m.context_counts, 16)
    # packed from the final draw: never short, never overlapping the (redrawn) targets
    assert min(m.context_counts) >= cfg.min_context
    assert not (tgt & ctx).any()
    if mode == "complement":
        assert torch.equal(ctx, ~tgt)
    else:  # inside the sample's 3x3 context block (4 x 4 x 0.85-1.0, strictly smaller than the grid)
        d = s.draw(2000, torch.Generator().manual_seed(3))
        assert torch.equal(d.context, ctx) and torch.equal(d.target, tgt)
        for b in range(2000):
            top, left, h, w = d.context_block[b].tolist()
            assert h == w == 3
            union = set()
            for bt, bl, bh, bw in d.target_blocks[b].tolist():
                union |= box_cells(bt, bl, bh, bw, 4)
            assert set(ctx[b].nonzero().flatten().tolist()) == box_cells(top, left, h, w, 4) - union


def test_impossible_min_context_is_a_clear_error():
    cfg = MaskConfig(block_scale=(0.5, 0.6), min_context=14, context="block")
    with pytest.raises(ConfigError, match="min_context"):
        MaskSampler(cfg, 4, 4).sample(8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="min_context"):
        MaskSampler(MaskConfig(min_context=4), 2, 2)
    with pytest.raises(ConfigError, match="masks.context"):
        MaskSampler(MaskConfig(context="ring"), 14, 14)


def test_flat_indices_address_rows_of_a_batch():
    s = MaskSampler(MaskConfig(), 4, 5)
    m = s.sample(3, torch.Generator().manual_seed(1))
    expected, start = [], 0
    for b, c in enumerate(m.target_counts):
        expected += [b * 20 + i for i in m.target_idx[start:start + c].tolist()]
        start += c
    assert m.flat_target().tolist() == expected


def test_repeat_shares_one_mask():
    m = MaskSampler(MaskConfig(), 6, 6).sample(1, torch.Generator().manual_seed(4))
    r = m.repeat(3)
    assert r.batch_size == 3 and r.context_counts == m.context_counts * 3
    assert r.flat_context().tolist() == [b * 36 + i for b in range(3) for i in m.context_idx.tolist()]


def test_block_sizes_and_aspect_in_range():
    # large grid so that rounding to whole patches is negligible
    cfg = MaskConfig()
    s = MaskSampler(cfg, 64, 64)
    h, w = s.block_sizes(20000, torch.Generator().manual_seed(2))
    frac = (h * w).double() / (64 * 64)
    assert frac.min() >= cfg.block_scale[0] - 0.01 and frac.max() <= cfg.block_scale[1] + 0.01
    aspect = h.double() / w.double()
    assert aspect.min() >= cfg.aspect_ratio[0] - 0.05 and aspect.max() <= cfg.aspect_ratio[1] + 0.05
    # both ends of the ranges are actually used
    assert frac.quantile(0.01) < 0.155 and frac.quantile(0.99) > 0.195
    assert aspect.quantile(0.01) < 0.8 and aspect.quantile(0.99) > 1.4


@pytest.mark.parametrize("grid", [(14, 14), (7, 11)])
def test_every_position_reachable_including_last_row_and_column(grid):
    H, W = grid
    d = MaskSampler(MaskConfig(), H, W).draw(3000, torch.Generator().manual_seed(4))
    for dense in (d.target, d.context):
        hits = dense.double().mean(0).view(H, W)
        assert (hits > 0).all(), "some grid position is never drawn"
        # symmetric coverage: corners are uniform over valid positions (I-JEPA's collator is not)
        assert torch.allclose(hits, hits.flip(0), atol=0.06)
        assert torch.allclose(hits, hits.flip(1), atol=0.06)
