"""Analytic FLOPs of one IWM training step, and model FLOPs utilisation (MFU) against the device peak.

Per ViT block and token of a sequence of length L and width D: 24 D^2 FLOPs for the qkv, output and
MLP (ratio 4) matmuls and 4 L D for the attention scores and their weighted sum (a multiply-add counts
2). A training step is 3x the forward FLOPs of the trained networks (forward + backward) plus the target
encoder's forward; patch embedding, norms and the loss are ignored (< 2%).
"""
from __future__ import annotations

from typing import Optional

import torch

# dense bf16 tensor-core peaks, FLOP/s
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def vit_forward_flops(tokens: float, seq_len: float, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    per_token = (8 + 4 * mlp_ratio) * width * width + 4 * seq_len * width
    return tokens * depth * per_token


def step_flops(cfg, context_tokens: float, target_tokens: float, batch: int) -> float:
    """FLOPs of one step for `batch` images with the given mean context / target tokens per image."""
    dim, depth, _ = cfg.model.encoder_dims()
    n = (cfg.data.img_size // cfg.model.patch_size) ** 2
    extra = cfg.views.action_dim if cfg.model.conditioning == "sequence" else 0
    pred_len = context_tokens + target_tokens + extra
    target_fwd = vit_forward_flops(batch * n, n, dim, depth, cfg.model.mlp_ratio)
    enc_fwd = vit_forward_flops(batch * context_tokens, context_tokens, dim, depth, cfg.model.mlp_ratio)
    pred_fwd = vit_forward_flops(batch * pred_len, pred_len, cfg.model.predictor_width, cfg.model.predictor_depth,
                                 cfg.model.mlp_ratio)
    return target_fwd + 3 * (enc_fwd + pred_fwd)


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The bf16 peak of a known CUDA device, else None (no MFU is reported on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
