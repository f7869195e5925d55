"""The IWM objective, defined once: targets and loss (docs/method.md, "Loss").

The regression targets are the target encoder's features of the target view y at the masked positions,
layer-normalised without affine parameters (as I-JEPA), with ``eps = cfg.model.target_norm_eps``. The loss is
the squared L2 distance between the predictor's outputs and those targets, averaged over tokens and
channels. Training calls :func:`iwm_loss` (the fused gather + layer norm + L2 kernel of
``kernels/l2_loss.py`` on CUDA); the MRR calls :func:`target_tokens`, the same targets materialised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.masks import MaskBatch
from kernels.l2_loss import masked_l2_loss


def target_tokens(target_feats: torch.Tensor, masks: MaskBatch, eps: float) -> torch.Tensor:
    """target_feats [B, N, D] (target encoder on y) -> packed targets [Tt, D] in fp32: each sample's
    masked positions in ``masks.target_idx`` order, layer-normalised."""
    B, N, D = target_feats.shape
    rows = target_feats.detach().reshape(B * N, D).index_select(0, masks.flat_target()).float()
    return F.layer_norm(rows, (D,), eps=eps)


def iwm_loss(pred: torch.Tensor, target_feats: torch.Tensor, masks: MaskBatch, eps: float) -> torch.Tensor:
    """mean((pred - target_tokens(target_feats, masks, eps))**2) over the [Tt, D] elements, fp32 scalar;
    gradient to ``pred`` only. Fused into one pass on CUDA (kernels.l2_loss)."""
    return masked_l2_loss(pred, target_feats, masks.flat_target(), eps=eps)
