"""Multi-block masks as I-JEPA / IWM draw them (``docs/method.md``, "Masks").

Per sample, on an H x W patch grid:
  targets  the union of ``num_blocks`` rectangular blocks, each of ``block_scale`` of the grid (uniform)
           with aspect ratio h / w in ``aspect_ratio`` (log-uniform); as I-JEPA, area = int(scale * H * W),
           h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), then at least 1 and at most H - 1
           (W - 1): a block never spans the whole grid;
  context  ``masks.context = 'block'`` (default, I-JEPA's encoder mask): one block of ``context_scale`` of
           the grid with aspect 1 (so 13 x 13 on a 14 x 14 grid), minus the target blocks (about 41% of a
           14 x 14 grid);
           ``'complement'``: every patch that is not a target (about 52%).
Every block's top-left corner is uniform over the positions where it fits, so every grid position, the
last row and column included, can be covered (I-JEPA's collator never reaches them: its issues
#40/#59/#60). A sample left with fewer than ``min_context`` context patches is redrawn whole (its target
blocks and its context block) until it has enough.

Every sample keeps its own number of context and target patches (ragged): nothing is truncated to the
batch minimum, unlike the I-JEPA collator (its issue #38). A batch of masks is stored packed: the patch
indices of all samples concatenated, sample 0 first, ascending within a sample, with the per-sample
counts on the host (attention kernels need them there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from engine.config import ConfigError, MaskConfig


@dataclass
class MaskBatch:
    grid: tuple  # (H, W) patches
    context_idx: torch.Tensor  # [Tc] patch index in [0, H*W), samples concatenated
    target_idx: torch.Tensor  # [Tt]
    context_counts: List[int]  # host copy of the per-sample counts
    target_counts: List[int]

    @property
    def batch_size(self) -> int:
        return len(self.context_counts)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _batch_of(self, counts: List[int]) -> torch.Tensor:
        device = self.context_idx.device  # output_size from the host counts: no device sync on CUDA
        return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                       torch.tensor(counts, device=device), output_size=sum(counts))

    @property
    def context_batch(self) -> torch.Tensor:  # [Tc] sample of each context token
        return self._batch_of(self.context_counts)

    @property
    def target_batch(self) -> torch.Tensor:  # [Tt]
        return self._batch_of(self.target_counts)

    def flat_context(self) -> torch.Tensor:
        """Row indices into a [B*N, D] view of per-sample token tensors."""
        return self.context_batch * self.num_patches + self.context_idx

    def flat_target(self) -> torch.Tensor:
        return self.target_batch * self.num_patches + self.target_idx

    def to(self, device, non_blocking: bool = True) -> "MaskBatch":
        return MaskBatch(self.grid, self.context_idx.to(device, non_blocking=non_blocking),
                         self.target_idx.to(device, non_blocking=non_blocking), self.context_counts,
                         self.target_counts)

    def head(self, k: int) -> "MaskBatch":
        """The masks of the first ``k`` samples (their packed rows come first)."""
        nc, nt = sum(self.context_counts[:k]), sum(self.target_counts[:k])
        return MaskBatch(self.grid, self.context_idx[:nc], self.target_idx[:nt], self.context_counts[:k],
                         self.target_counts[:k])

    def repeat(self, times: int) -> "MaskBatch":
        """This single-sample mask for `times` samples (the MRR's candidates share one mask)."""
        if self.batch_size != 1:
            raise ValueError(f"repeat() takes a single-sample MaskBatch, got {self.batch_size} samples")
        return MaskBatch(self.grid, self.context_idx.repeat(times), self.target_idx.repeat(times),
                         self.context_counts * times, self.target_counts * times)


class MaskDraw(NamedTuple):
    """One batch's draw, dense, after the redraws: what :meth:`MaskSampler.sample` packs."""

    target: torch.Tensor  # [B, N] bool
    context: torch.Tensor  # [B, N] bool
    target_blocks: torch.Tensor  # [B, num_blocks, 4] long: top, left, height, width
    context_block: torch.Tensor  # [B, 4] long; the whole grid in 'complement' mode


def _pack(mask: torch.Tensor):
    """[B, N] bool -> (indices [T], counts list)."""
    return mask.nonzero()[:, 1], mask.sum(1).tolist()  # row-major: sample 0's indices first, ascending


class MaskSampler:
    """Draws target blocks and a context block per sample on an ``H x W`` patch grid (on the CPU: it is a
    few vectorised ops per batch; the packed indices then move to the device)."""

    def __init__(self, cfg: MaskConfig, grid_h: int, grid_w: int):
        cfg.validate()
        self.cfg, self.h, self.w = cfg, grid_h, grid_w
        if grid_h * grid_w - 1 < cfg.min_context:
            raise ConfigError(f"a {grid_h}x{grid_w} patch grid cannot leave masks.min_context={cfg.min_context} "
                              f"context patches: use a larger image or a smaller patch")

    def block_sizes(self, n: int, g: torch.Generator, scale=None, aspect_ratio=None):
        """Heights and widths [n] of blocks covering scale * H * W patches with aspect h / w (defaults:
        the target blocks' ranges)."""
        lo, hi = scale if scale is not None else self.cfg.block_scale
        s = lo + (hi - lo) * torch.rand(n, generator=g)
        alo, ahi = aspect_ratio if aspect_ratio is not None else self.cfg.aspect_ratio
        # aspect ratio drawn log-uniformly so that r and 1/r are equally likely (as I-JEPA)
        aspect = torch.exp(math.log(alo) + (math.log(ahi) - math.log(alo)) * torch.rand(n, generator=g))
        area = (s * self.h * self.w).floor()  # I-JEPA's max_keep = int(scale * H * W)
        # as I-JEPA: a block is strictly smaller than the grid (its `while h >= height: h -= 1`)
        bh = torch.sqrt(area * aspect).round().clamp(1, max(1, self.h - 1)).long()
        bw = torch.sqrt(area / aspect).round().clamp(1, max(1, self.w - 1)).long()
        return bh, bw

    def _blocks(self, n: int, g: torch.Generator, scale=None, aspect_ratio=None):
        """n blocks: ([n, 4] top, left, height, width; [n, N] bool)."""
        bh, bw = self.block_sizes(n, g, scale, aspect_ratio)
        # top in [0, H - bh] inclusive: every row, the last one included, can be covered
        top = (torch.rand(n, generator=g) * (self.h - bh + 1)).floor().long()
        left = (torch.rand(n, generator=g) * (self.w - bw + 1)).floor().long()
        rows = torch.arange(self.h)[None, :]
        cols = torch.arange(self.w)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])  # [n, H]
        in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])  # [n, W]
        dense = (in_rows[:, :, None] & in_cols[:, None, :]).view(n, self.h * self.w)
        return torch.stack((top, left, bh, bw), dim=1), dense

    def _draw_once(self, batch: int, g: torch.Generator) -> MaskDraw:
        k, N = self.cfg.num_blocks, self.h * self.w
        boxes, dense = self._blocks(batch * k, g)
        target = dense.view(batch, k, N).any(1)  # [B, N] union
        if self.cfg.context == "block":
            context_block, context = self._blocks(batch, g, self.cfg.context_scale, (1.0, 1.0))
            context = context & ~target
        else:
            context_block = torch.tensor([0, 0, self.h, self.w]).expand(batch, 4).clone()
            context = ~target
        return MaskDraw(target, context, boxes.view(batch, k, 4), context_block)

    def draw(self, batch: int, generator: Optional[torch.Generator] = None) -> MaskDraw:
        """The dense draw of ``batch`` samples; samples with fewer than ``min_context`` context patches are
        redrawn whole (target blocks and context block), up to 100 rounds."""
        g = generator if generator is not None else torch.default_generator
        d = self._draw_once(batch, g)
        for _ in range(100):
            bad = d.context.sum(1) < self.cfg.min_context
            if not bad.any():
                return d
            redo = self._draw_once(int(bad.sum()), g)
            for field, new in zip(d, redo):
                field[bad] = new
        raise ConfigError(f"could not draw masks leaving masks.min_context={self.cfg.min_context} context patches "
                          f"on a {self.h}x{self.w} grid: lower masks.min_context, masks.block_scale or "
                          f"masks.num_blocks, or raise masks.context_scale")

    def sample(self, batch: int, generator: Optional[torch.Generator] = None) -> MaskBatch:
        """A packed :class:`MaskBatch` of ``batch`` samples (:meth:`draw`, packed)."""
        d = self.draw(batch, generator)
        t_idx, t_counts = _pack(d.target)
        c_idx, c_counts = _pack(d.context)
        return MaskBatch((self.h, self.w), c_idx, t_idx, c_counts, t_counts)


def all_patches_masks(batch: int, grid: tuple, device) -> MaskBatch:
    """The MaskBatch in which every patch of every sample is both visible (context) and predicted (target),
    each sample's patches in raster order."""
    n = grid[0] * grid[1]
    idx = torch.arange(n, device=device).repeat(batch)
    counts = [n] * batch
    return MaskBatch(grid=tuple(grid), context_idx=idx, target_idx=idx, context_counts=counts,
                     target_counts=counts)
