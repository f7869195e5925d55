"""Mask statistics over many draws, checked against plain counting."""
import math

import pytest
import torch

from engine.config import MaskConfig
from engine.masks import MaskSampler


def dense_from_packed(idx, cu, n):
    """Plain loop: packed indices -> [B, N] bool."""
    out = torch.zeros(len(cu) - 1, n, dtype=torch.bool)
    for b in range(len(cu) - 1):
        for i in idx[cu[b]:cu[b + 1]].tolist():
            out[b, i] = True
    return out


def test_context_is_the_complement_of_target_and_ragged():
    s = MaskSampler(MaskConfig(), 14, 14)
    m = s.sample(64, torch.Generator().manual_seed(0))
    tgt = dense_from_packed(m.target_idx, m.target_cu, 196)
    ctx = dense_from_packed(m.context_idx, m.context_cu, 196)
    assert torch.equal(tgt, ~ctx)
    assert m.target_counts == tgt.sum(1).tolist()
    assert m.context_counts == ctx.sum(1).tolist()
    # ragged: counts differ between samples, and nothing is truncated to the batch minimum
    assert len(set(m.context_counts)) > 5
    assert sum(m.context_counts) + sum(m.target_counts) == 64 * 196
    assert min(m.context_counts) >= MaskConfig().min_context


def test_flat_indices_address_rows_of_a_batch():
    s = MaskSampler(MaskConfig(), 4, 5)
    m = s.sample(3, torch.Generator().manual_seed(1))
    flat = m.flat_target().tolist()
    expected = []
    for b in range(3):
        expected += [b * 20 + i for i in m.target_idx[m.target_cu[b]:m.target_cu[b + 1]].tolist()]
    assert flat == expected


def test_block_sizes_and_aspect_in_range():
    # large grid so that rounding to whole patches is negligible
    cfg = MaskConfig()
    s = MaskSampler(cfg, 64, 64)
    h, w = s.block_sizes(20000, torch.Generator().manual_seed(2))
    frac = (h * w).double() / (64 * 64)
    tol = 0.01
    assert frac.min() >= cfg.block_scale[0] - tol and frac.max() <= cfg.block_scale[1] + tol
    aspect = h.double() / w.double()
    assert aspect.min() >= cfg.aspect_ratio[0] - 0.05 and aspect.max() <= cfg.aspect_ratio[1] + 0.05
    # both ends of the ranges are actually used
    assert frac.quantile(0.01) < 0.155 and frac.quantile(0.99) > 0.195
    assert aspect.quantile(0.01) < 0.8 and aspect.quantile(0.99) > 1.4


def test_union_of_four_blocks_covers_expected_fraction():
    # each block covers 15-20% of the grid; the union of 4 overlapping ones covers less than 4 x 20%
    s = MaskSampler(MaskConfig(), 14, 14)
    m = s.sample(2000, torch.Generator().manual_seed(3))
    frac = torch.tensor(m.target_counts, dtype=torch.float64) / 196
    assert 0.15 <= frac.min() and frac.max() <= 0.8 + 1e-9
    assert 0.35 < frac.mean() < 0.65


@pytest.mark.parametrize("grid", [(14, 14), (7, 11)])
def test_every_position_reachable_including_last_row_and_column(grid):
    H, W = grid
    s = MaskSampler(MaskConfig(), H, W)
    m = s.sample(3000, torch.Generator().manual_seed(4))
    hits = m.target_mask().double().mean(0).view(H, W)
    assert (hits > 0).all(), "some grid position is never a target"
    # the last row / column are covered about as often as the first (I-JEPA's collator never did)
    assert hits[-1].mean() > 0.5 * hits[0].mean()
    assert hits[:, -1].mean() > 0.5 * hits[:, 0].mean()
    # symmetric coverage: a block's top-left is uniform over valid corners, so the map is symmetric
    assert torch.allclose(hits, hits.flip(0), atol=0.06)
    assert torch.allclose(hits, hits.flip(1), atol=0.06)


def test_single_block_area_matches_scale():
    cfg = MaskConfig(num_blocks=1)
    s = MaskSampler(cfg, 32, 32)
    m = s.sample(2000, torch.Generator().manual_seed(5))
    frac = torch.tensor(m.target_counts, dtype=torch.float64) / 1024
    # rounding h and w to whole patches on a 32x32 grid moves the area by at most ~8%
    assert frac.min() >= 0.15 * 0.92 and frac.max() <= 0.2 * 1.08
    assert math.isclose(frac.mean().item(), 0.175, abs_tol=0.01)


def test_too_small_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="min_context"):
        MaskSampler(MaskConfig(min_context=4), 2, 2)
