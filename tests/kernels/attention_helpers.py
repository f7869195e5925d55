"""Test (and benchmark) helpers for ragged attention: the dense block-diagonal bias that xformers'
``BlockDiagonalMask`` stands for, the mask ``kernels.attention`` builds, materialised on CPU, and dense
attention with an additive bias. Built independently of ``kernels/attention.py`` (except
:func:`xformers_block_diagonal_bias`, which materialises that module's own mask to test it)."""
from typing import Sequence

import torch
import torch.nn.functional as F


def block_diagonal_bias(seqlens: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Dense ``[T, T]`` additive bias: 0 inside each sample's block, -inf elsewhere."""
    sample = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor([int(n) for n in seqlens]))
    same = (sample[:, None] == sample[None, :]).to(device)
    return torch.zeros(same.shape, dtype=dtype, device=device).masked_fill_(~same, float("-inf"))


def xformers_block_diagonal_bias(seqlens: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """The mask the xformers path of ``kernels.attention`` uses, materialised on CPU (needs xformers)."""
    from kernels.attention import _block_diagonal_mask

    T = int(sum(seqlens))
    return _block_diagonal_mask(tuple(int(n) for n in seqlens)).materialize((T, T), dtype=dtype, device="cpu")


def attention_with_bias(q, k, v, bias: torch.Tensor) -> torch.Tensor:
    """Dense attention over the whole packed sequence (``[T, H, Dh]``) with an additive ``[T, T]`` bias."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=bias.to(q.dtype))
    return out[0].transpose(0, 1)
