"""The FLOPs estimate against a count of the matmuls of one timm block."""
import pytest
import torch
from timm.models.vision_transformer import Block

from engine.flops import vit_forward_flops


def test_block_flops_match_matmul_count():
    D, L = 64, 10
    blk = Block(D, 4, mlp_ratio=4.0, qkv_bias=True)
    # count 2 * in * out FLOPs per token for every Linear, plus q@k^T and attn@v
    linear = sum(2 * m.in_features * m.out_features for m in blk.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * L * D * 2
    assert vit_forward_flops(L, L, D, 1) == pytest.approx(L * (linear + attention))
