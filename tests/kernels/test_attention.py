"""Ragged attention backends against a plain per-sample loop; the xformers mask logic on CPU."""
import math

import pytest
import torch

from benchmarks.common import attention_with_bias, block_diagonal_bias
from kernels import attention as A
from kernels import dispatch
from tests.kernels.attention_helpers import xformers_block_diagonal_bias


def plain_attention(q, k, v, seqlens):
    """Token-by-token loop: each query attends to the keys of its own sample only."""
    out = torch.zeros_like(q)
    start = 0
    for n in seqlens:
        for i in range(start, start + n):
            for h in range(q.shape[1]):
                scores = torch.tensor([float(q[i, h] @ k[j, h]) / math.sqrt(q.shape[2])
                                       for j in range(start, start + n)])
                w = torch.softmax(scores, 0)
                out[i, h] = sum(w[t] * v[start + t, h] for t in range(n))
        start += n
    return out


def ragged(seqlens, H=2, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(seqlens)
    return [torch.randn(T, H, Dh, generator=g) for _ in range(3)]


SEQLENS = [5, 1, 9, 3]  # a single-token sample included


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_backends_match_plain_loop(backend):
    q, k, v = ragged(SEQLENS)
    out = A.ragged_attention(q, k, v, SEQLENS, backend=backend)
    torch.testing.assert_close(out, plain_attention(q, k, v, SEQLENS), atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_match_reference():
    q, k, v = ragged([7, 2, 4], seed=1)
    grads = []
    for backend in ("reference", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = A.ragged_attention(*leaves, [7, 2, 4], backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_diagonal_bias_is_block_diagonal():
    bias = block_diagonal_bias([2, 3])
    inf = float("-inf")
    expected = torch.tensor([[0, 0, inf, inf, inf], [0, 0, inf, inf, inf], [inf, inf, 0, 0, 0],
                             [inf, inf, 0, 0, 0], [inf, inf, 0, 0, 0]])
    assert torch.equal(bias, expected)


def test_dense_bias_attention_matches_plain_loop():
    q, k, v = ragged(SEQLENS, seed=2)
    out = attention_with_bias(q, k, v, block_diagonal_bias(SEQLENS))
    torch.testing.assert_close(out, plain_attention(q, k, v, SEQLENS), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not A.xformers_available(), reason="xformers not installed")
def test_xformers_mask_materialised_equals_ours_and_gives_same_attention():
    q, k, v = ragged(SEQLENS, seed=3)
    xb = xformers_block_diagonal_bias(SEQLENS)
    assert torch.equal(xb, block_diagonal_bias(SEQLENS))
    out_x = attention_with_bias(q, k, v, xb)
    torch.testing.assert_close(out_x, A.ragged_attention(q, k, v, SEQLENS, backend="sdpa"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_x, plain_attention(q, k, v, SEQLENS), atol=1e-5, rtol=1e-5)


def test_auto_falls_back_to_sdpa_on_cpu():
    dispatch.set_attention_backend(None)
    assert A.resolve_backend(torch.device("cpu")) == "sdpa"


def test_forcing_xformers_without_cuda_is_a_clear_error():
    dispatch.set_attention_backend("xformers")
    try:
        with pytest.raises(RuntimeError, match="needs CUDA"):
            A.resolve_backend(torch.device("cpu"))
    finally:
        dispatch.set_attention_backend(None)


def test_bad_backend_and_bad_lengths():
    with pytest.raises(ValueError, match="use one of"):
        dispatch.set_attention_backend("flash")
    q, k, v = ragged([3, 3])
    with pytest.raises(ValueError, match="seqlens sum"):
        A.ragged_attention(q, k, v, [3, 2], backend="sdpa")
