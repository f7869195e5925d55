"""Test helper for ragged attention: the mask the xformers path of ``kernels.attention`` builds, materialised
on CPU, to compare with the dense block-diagonal bias that xformers' ``BlockDiagonalMask`` stands for
(:func:`benchmarks.common.block_diagonal_bias`, built independently of ``kernels/attention.py``; it lives
there because ``benchmarks/attention_table.py`` times it too, and a benchmark does not import the tests)."""
from typing import Sequence

import torch


def xformers_block_diagonal_bias(seqlens: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """The mask the xformers path of ``kernels.attention`` uses, materialised on CPU (needs xformers)."""
    from kernels.attention import _block_diagonal_mask

    T = int(sum(seqlens))
    return _block_diagonal_mask(tuple(int(n) for n in seqlens)).materialize((T, T), dtype=dtype, device="cpu")
