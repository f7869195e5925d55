"""Classification heads that read a network's tokens: the attentive head (V-JEPA's attentive classifier) and
the average-pooled head (finetuning's layer norm + linear, the linear probe's batch norm + linear).
``engine/finetune.py`` puts them on the encoder or the predictor."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ConfigError

# V-JEPA's attentive head draws its weights from N(0, 0.02^2): a per-layer gain of 0.02 * sqrt(fan_in), 0.39 at
# width 384 (the narrowest network of the paper, its ViT-B predictor) but 0.14 at 48. There the first logits are
# about 16x smaller, every gradient passes through several such layers, and a head on a tiny network sits on the
# ln(classes) loss plateau for hundreds of steps; when it leaves depends more on luck than on the features
# (docs/finetune.md, "The head's initialisation"). Layers narrower than 384 get the gain of a 384-wide one.
HEAD_INIT_STD, HEAD_INIT_WIDTH = 0.02, 384


def head_init_std(fan_in: int) -> float:
    """The std of a head weight with `fan_in` inputs: 0.02 from 384 inputs up, 0.02 * sqrt(384 / fan_in) below."""
    return HEAD_INIT_STD * math.sqrt(max(1.0, HEAD_INIT_WIDTH / fan_in))


class AttentiveHead(nn.Module):
    """V-JEPA's attentive classifier: one learned query, one cross-attention block (the query attends to
    the layer-normed tokens; residual; MLP with residual), then a linear layer. tokens [B, N, D] -> [B, C].
    Weights: V-JEPA's N(0, 0.02^2) at widths from 384 up, the same per-layer gain below (`head_init_std`)."""

    def __init__(self, dim: int, heads: int, classes: int, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.layers import Mlp

        if dim % heads:
            raise ConfigError(f"attentive head: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.linear = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.query, std=HEAD_INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=head_init_std(m.in_features))
                nn.init.zeros_(m.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, D]: the query after the cross-attention block."""
        B, N, D = tokens.shape
        h = self.heads
        x = self.norm1(tokens)
        q = self.q(self.query).expand(B, 1, D).reshape(B, 1, h, D // h).transpose(1, 2)  # [B, h, 1, Dh]
        k, v = self.kv(x).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)  # [B, h, N, Dh] each
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        query = self.query + self.proj(attended)
        query = query + self.mlp(self.norm2(query))
        return query[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(tokens))


class PooledHead(nn.Module):
    """Average-pooled tokens -> a norm -> linear. 'layer' (finetuning, MAE's fc_norm) or 'batch' (the linear
    probe: batch norm without affine parameters, MAE's linear-probing protocol)."""

    def __init__(self, dim: int, classes: int, norm: str = "layer"):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm == "layer" else nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01 if norm == "batch" else 2e-5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens.mean(1)))
