"""Collapse monitors: statistics read at log steps that show a representation or a predictor collapsing
(docs/method.md, "Monitors").

Of the targets (the layer-normed target-encoder features the loss regresses, ``engine/loss.py``):
  target_std     per (position, channel), the std across the images of the batch, averaged. Layer norm
                 gives every token unit variance over its channels, so this is in [0, 1]; its square is
                 the loss of the best predictor that ignores the image (the batch mean at each position)
  rankme         RankMe (Garrido et al., 2023): exp(entropy of the normalised singular values) of the
                 image-level target features (mean over positions) of the last ``train.monitor_window``
                 batches; 1 when every image has the same feature, at most min(rows, width)
Of the predictor:
  pred_spread    per image and channel, the std of the predictions across the image's target positions,
                 averaged (V-JEPA's ``pstd_z``); 0 when every position gets the same prediction
  spatial_r2     the share of the targets' within-image variance the predictions explain:
                 1 - sum ||(p - mean_img p) - (t - mean_img t)||^2 / sum ||t - mean_img t||^2 over the
                 batch's target tokens (0 for one prediction per image, 1 for a perfect spatial layout)
  action_effect  the mean squared change of the predictions (per element, in the targets' unit
                 variance) when each sample's action is replaced by another sample's: 0 when the
                 predictor ignores the action (an invariant world model, or the action path shut)

All but ``action_effect`` reuse tensors of the step; ``action_effect`` runs the encoder and the predictor
without gradient on ``train.monitor_samples`` samples (twice the predictor: both actions in one packed call).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from engine.masks import MaskBatch

# A representation has collapsed when the targets no longer tell the images apart. target_std < 0.1: the
# targets' variation across images is under 1% of their (layer-normed, unit) variance, so predicting one
# constant per position reaches a loss under 0.01 without looking at the image. rankme < 2: the image-level
# features of a whole window span fewer than two effective directions (a complete collapse gives exactly 1).
COLLAPSE_STD = 0.1
COLLAPSE_RANK = 2.0


def segment_mean(x: torch.Tensor, batch: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [T, D] packed tokens, batch [T] their sample, counts [B] -> per-sample mean [B, D]."""
    out = torch.zeros(counts.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    return out.index_add_(0, batch, x) / counts.clamp(min=1)[:, None].to(x.dtype)


def within_image(x: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
    """Packed [Tt, D] target tokens minus their image's mean token."""
    batch = masks.target_batch
    counts = torch.tensor(masks.target_counts, device=x.device)
    return x - segment_mean(x, batch, counts)[batch]


def target_std(target_feats: torch.Tensor, eps: float) -> torch.Tensor:
    """target_feats [B, N, D] -> the std across the batch of the layer-normed features, mean over (N, D)."""
    t = F.layer_norm(target_feats.float(), target_feats.shape[-1:], eps=eps)
    return t.std(0, unbiased=False).mean()


def rankme(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe of features [M, D]: exp(-sum p_k log p_k), p = singular values / their sum (+ eps, as the
    paper). The singular values come from the D x D Gram matrix (cheaper than an SVD of [M, D] for M > D)."""
    x = features.double()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    p = sv / sv.sum().clamp(min=1e-30) + eps  # all-zero features: rank ~1, not nan
    return torch.exp(-(p * p.log()).sum())


def pred_spread(pred: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
    """pred [Tt, D] -> per image and channel the std across the image's target positions, averaged."""
    c = within_image(pred.float(), masks)
    counts = torch.tensor(masks.target_counts, device=pred.device)
    var = segment_mean(c.pow(2), masks.target_batch, counts)  # [B, D]
    return var.sqrt().mean()


def spatial_r2(pred: torch.Tensor, targets: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
    """pred, targets [Tt, D] -> 1 - sum ||pc - tc||^2 / sum ||tc||^2, with pc, tc each token minus its image's mean."""
    pc, tc = within_image(pred.double(), masks), within_image(targets.double(), masks)
    return 1.0 - (pc - tc).pow(2).sum() / tc.pow(2).sum().clamp(min=1e-12)


def tiled(masks: MaskBatch, times: int) -> MaskBatch:
    """The batch's masks ``times`` times over, batch after batch (samples 0..B-1, then 0..B-1 again, ...)."""
    return MaskBatch(masks.grid, masks.context_idx.repeat(times), masks.target_idx.repeat(times),
                     masks.context_counts * times, masks.target_counts * times)


def action_effect(pred_a: torch.Tensor, pred_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two predictions of the same tokens [T, D] under different actions."""
    return (pred_a.float() - pred_b.float()).pow(2).mean()


class FeatureWindow:
    """The image-level target features of the last ``batches`` batches, on the device (no host sync)."""

    def __init__(self, batches: int):
        self.batches = batches
        self.rows: Optional[torch.Tensor] = None  # [batches, B, D]
        self.filled = 0
        self.slot = 0

    def add(self, target_feats: torch.Tensor) -> None:
        pooled = target_feats.detach().float().mean(1)  # [B, D]
        if self.rows is None or self.rows.shape[1:] != pooled.shape:
            self.rows = pooled.new_zeros(self.batches, *pooled.shape)
            self.filled = self.slot = 0
        self.rows[self.slot] = pooled
        self.slot = (self.slot + 1) % self.batches
        self.filled = min(self.filled + 1, self.batches)

    def features(self) -> torch.Tensor:  # [filled * B, D]
        return self.rows[:self.filled].reshape(-1, self.rows.shape[-1])


def collapse_warning(values: Dict[str, float]) -> Optional[str]:
    """The warning line when a monitor has crossed its collapse threshold (None while none has)."""
    low = []
    if values.get("target_std", math.inf) < COLLAPSE_STD:
        low.append(f"target_std {values['target_std']:.3g} < {COLLAPSE_STD}")
    if values.get("rankme", math.inf) < COLLAPSE_RANK:
        low.append(f"rankme {values['rankme']:.3g} < {COLLAPSE_RANK} (1: every image the same)")
    if not low:
        return None
    return (f"the target representation is collapsing ({', '.join(low)}): the targets barely differ between "
            f"images; check the EMA (optim.ema), the LR (optim.lr) and the views (docs/method.md, \"Monitors\")")


@torch.no_grad()
def held_out_spatial(model, target_encoder, images: torch.Tensor, cfg, generator: torch.Generator,
                     chunk: int = 64) -> Dict[str, float]:
    """The spatial monitors on held-out images [M, 3, H, W] (``python -m engine.eval mrr`` prints them): the
    training protocol (views, action, masks) with draws from ``generator``, pooled over all images."""
    from engine.loss import target_tokens
    from engine.masks import MaskSampler
    from engine.views import make_views

    sampler = MaskSampler(cfg.masks, *model.encoder.grid)
    mask_gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator,
                                                               device=generator.device)))
    num = den = spread = 0.0
    for s in range(0, len(images), chunk):
        source, target, action, _, _ = make_views(images[s:s + chunk], cfg.views, generator=generator)
        masks = sampler.sample(len(source), mask_gen).to(images.device)
        pred = model.predictor(model.encoder(source, masks), masks, action).double()
        t = target_tokens(target_encoder(target), masks, cfg.model.target_norm_eps).double()
        pc, tc = within_image(pred, masks), within_image(t, masks)
        num, den = num + (pc - tc).pow(2).sum().item(), den + tc.pow(2).sum().item()
        spread += pred_spread(pred, masks).item() * len(source)
    return {"spatial_r2": 1.0 - num / den, "pred_spread": spread / len(images)}
