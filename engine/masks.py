"""Multi-block masks: the union of rectangular blocks is the target, its complement the context.

Every sample keeps its own number of context and target patches (ragged): nothing is truncated to the
batch minimum, unlike the I-JEPA collator (its issue #38), and block corners are drawn so that every
grid position, the last row and column included, can be covered (its issues #40/#59/#60).

A batch of masks is stored packed: the patch indices of all samples concatenated, with offsets
(``cu_*``, length B+1) and the per-sample counts on the host (attention kernels need them there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from engine.config import ConfigError, MaskConfig


@dataclass
class MaskBatch:
    grid: tuple  # (H, W) patches
    context_idx: torch.Tensor  # [Tc] patch index in [0, H*W), samples concatenated
    target_idx: torch.Tensor  # [Tt]
    context_cu: torch.Tensor  # [B+1] offsets into context_idx
    target_cu: torch.Tensor  # [B+1]
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
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return MaskBatch(self.grid, mv(self.context_idx), mv(self.target_idx), mv(self.context_cu),
                         mv(self.target_cu), self.context_counts, self.target_counts)

    def repeat(self, times: int) -> "MaskBatch":
        """This single-sample mask for `times` samples (the MRR's candidates share one mask)."""
        if self.batch_size != 1:
            raise ValueError(f"repeat() takes a single-sample MaskBatch, got {self.batch_size} samples")
        nc, nt = self.context_counts[0], self.target_counts[0]
        cu = lambda n: torch.arange(times + 1, device=self.context_idx.device) * n  # noqa: E731
        return MaskBatch(self.grid, self.context_idx.repeat(times), self.target_idx.repeat(times), cu(nc),
                         cu(nt), [nc] * times, [nt] * times)

    def target_mask(self) -> torch.Tensor:
        """Dense [B, N] bool: True at target positions (for tests and plots)."""
        m = torch.zeros(self.batch_size, self.num_patches, dtype=torch.bool, device=self.target_idx.device)
        m[self.target_batch, self.target_idx] = True
        return m


def _pack(mask: torch.Tensor):
    """[B, N] bool -> (indices [T], offsets [B+1], counts list)."""
    counts = mask.sum(1)
    idx = mask.nonzero()[:, 1]  # row-major: sample 0's indices first, ascending
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.long)
    cu[1:] = counts.cumsum(0)
    return idx, cu, counts.tolist()


class MaskSampler:
    """Draws ``cfg.num_blocks`` target blocks per sample on an ``H x W`` patch grid (on the CPU: it is
    a few vectorised ops per batch; the packed indices then move to the device)."""

    def __init__(self, cfg: MaskConfig, grid_h: int, grid_w: int):
        cfg.validate()
        self.cfg, self.h, self.w = cfg, grid_h, grid_w
        if grid_h * grid_w - 1 < cfg.min_context:
            raise ConfigError(f"a {grid_h}x{grid_w} patch grid cannot leave masks.min_context={cfg.min_context} "
                             f"context patches: use a larger image or a smaller patch")

    def block_sizes(self, n: int, g: torch.Generator):
        """Heights and widths [n] of blocks covering scale*H*W patches with aspect h/w."""
        lo, hi = self.cfg.block_scale
        scale = lo + (hi - lo) * torch.rand(n, generator=g)
        alo, ahi = self.cfg.aspect_ratio
        # aspect ratio drawn log-uniformly so that r and 1/r are equally likely
        aspect = torch.exp(math.log(alo) + (math.log(ahi) - math.log(alo)) * torch.rand(n, generator=g))
        area = scale * self.h * self.w
        bh = torch.sqrt(area * aspect).round().clamp(1, self.h).long()
        bw = torch.sqrt(area / aspect).round().clamp(1, self.w).long()
        return bh, bw

    def _draw(self, batch: int, g: torch.Generator) -> torch.Tensor:
        k = self.cfg.num_blocks
        bh, bw = self.block_sizes(batch * k, g)
        # top in [0, H - bh] inclusive: every row, the last one included, can be covered
        top = (torch.rand(batch * k, generator=g) * (self.h - bh + 1)).floor().long()
        left = (torch.rand(batch * k, generator=g) * (self.w - bw + 1)).floor().long()
        rows = torch.arange(self.h)[None, :]
        cols = torch.arange(self.w)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])  # [B*k, H]
        in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])  # [B*k, W]
        blocks = in_rows[:, :, None] & in_cols[:, None, :]  # [B*k, H, W]
        return blocks.view(batch, k, self.h * self.w).any(1)  # [B, N] union

    def sample(self, batch: int, generator: Optional[torch.Generator] = None) -> MaskBatch:
        g = generator if generator is not None else torch.default_generator
        target = self._draw(batch, g)
        for _ in range(100):  # redraw samples whose context is too small
            bad = (~target).sum(1) < self.cfg.min_context
            if not bad.any():
                break
            target[bad] = self._draw(int(bad.sum()), g)
        else:
            raise ConfigError("could not draw masks leaving masks.min_context patches: lower masks.block_scale "
                              "or masks.num_blocks")
        t_idx, t_cu, t_counts = _pack(target)
        c_idx, c_cu, c_counts = _pack(~target)
        return MaskBatch((self.h, self.w), c_idx, t_idx, c_cu, t_cu, c_counts, t_counts)
