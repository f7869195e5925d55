"""kernels/gather.py: Triton gather (interpreter) and the reference against plain loops.

Tolerances (fp32): forward is a copy, compared exactly. Backward accumulates repeated indices with fp32
atomics in an unspecified order: atol = rtol = 1e-6 against a float64 loop (values ~N(0, 1), at most a
handful of repeats per row).
"""
import pytest
import torch

from kernels.gather import gather_tokens, gather_tokens_reference


def plain_gather(x, flat_idx):
    B, N, D = x.shape
    out = torch.empty(len(flat_idx), D, dtype=x.dtype)
    for t, i in enumerate(flat_idx.tolist()):
        out[t] = x[i // N, i % N]
    return out


def plain_gather_grad(g, flat_idx, shape):
    B, N, D = shape
    gx = torch.zeros(B, N, D, dtype=torch.float64)
    for t, i in enumerate(flat_idx.tolist()):
        gx[i // N, i % N] += g[t].double()
    return gx


def ragged_idx(sizes, N, gen, repeats=False):
    """Pack per-sample index sets (sample b has sizes[b] tokens) as b*N + n."""
    parts = []
    for b, k in enumerate(sizes):
        n = torch.randint(0, N, (k,), generator=gen) if repeats else torch.randperm(N, generator=gen)[:k]
        parts.append(b * N + n)
    return torch.cat(parts)


CASES = [  # (B, N, D, per-sample token counts, repeated indices?)
    (3, 50, 384, [1, 23, 14], False),   # a single-token sample; T = 38 (not a multiple of the block)
    (2, 17, 1023, [17, 5], True),       # odd width, repeats
    (2, 9, 1280, [9, 1], True),
]


@pytest.mark.parametrize("B,N,D,sizes,repeats", CASES)
def test_gather_triton_matches_loop(triton_backend, B, N, D, sizes, repeats):
    gen = torch.Generator().manual_seed(B * 1000 + D)
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    idx = ragged_idx(sizes, N, gen, repeats)
    out = gather_tokens(x, idx)
    assert "GatherTokensFunction" in type(out.grad_fn).__name__
    assert torch.equal(out, plain_gather(x.detach(), idx))
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    torch.testing.assert_close(x.grad.double(), plain_gather_grad(g, idx, (B, N, D)), atol=1e-6, rtol=1e-6)


def test_gather_heavy_repeats_backward(triton_backend):
    # many tokens hitting the same few rows, inside one program and across programs
    x = torch.randn(2, 4, 384, requires_grad=True)
    idx = torch.tensor([0, 0, 0, 7, 7, 3] * 7 + [0])
    out = gather_tokens(x, idx)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad.double(), plain_gather_grad(g, idx, (2, 4, 384)), atol=1e-5, rtol=1e-6)


def test_gather_reference_matches_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 33, generator=gen, requires_grad=True)
    idx = torch.tensor([0, 32, 32, 5, 12])
    out = gather_tokens(x, idx)  # auto on CPU -> reference
    assert torch.equal(out, plain_gather(x.detach(), idx))
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    torch.testing.assert_close(x.grad.double(), plain_gather_grad(g, idx, (3, 11, 33)))


def test_gather_noncontiguous_input_and_int32_idx(triton_backend):
    base = torch.randn(40, 2, 3)  # x = base.permute -> [2, 3, 40], not contiguous
    x = base.permute(1, 2, 0).requires_grad_()
    idx = torch.tensor([5, 0, 2, 2], dtype=torch.int32)
    out = gather_tokens(x, idx)
    assert torch.equal(out, plain_gather(x.detach(), idx.long()))
    out.sum().backward()
    torch.testing.assert_close(x.grad.double(), plain_gather_grad(torch.ones(4, 40), idx.long(), (2, 3, 40)))


def test_gather_empty(triton_backend):
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = gather_tokens(x, torch.empty(0, dtype=torch.long))
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 3, 8))


def test_gather_bf16(triton_backend):
    # forward is an exact copy; backward is a bf16 index_add_ (repeats round in bf16), so it matches
    # the float64 loop to bf16 rounding (rtol = atol = 1e-2)
    x = torch.randn(2, 5, 384).to(torch.bfloat16).requires_grad_()
    idx = torch.tensor([9, 0, 4, 4, 4])
    out = gather_tokens(x, idx)
    assert torch.equal(out, gather_tokens_reference(x, idx))
    g = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(g)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), plain_gather_grad(g, idx, (2, 5, 384)), rtol=1e-2, atol=1e-2)


def test_gather_rejects_bad_shapes():
    with pytest.raises(ValueError):
        gather_tokens(torch.randn(4, 5), torch.tensor([0]))
    with pytest.raises(ValueError):
        gather_tokens(torch.randn(1, 4, 5), torch.tensor([[0]]))


@pytest.mark.parametrize("D,blocks", [(768, (16, 256)), (1280, (16, 256)), (1023, (4, 1024))])
def test_gather_at_cuda_tiles(cuda_tiles, launch_grids, D, blocks):
    # the CUDA tiles under the interpreter: several column tiles per row (768 -> 3 x 256, 1280 -> 5 x
    # 256), several row tiles, and repeated indices whose fp32 atomics come from different row tiles
    import kernels.gather as mod
    from kernels import dispatch
    t = dispatch.tiles("gather_tokens", D, False)
    assert (t.block_t, t.block_d) == blocks
    fwd, bwd = launch_grids(mod, "_gather_fwd_kernel"), launch_grids(mod, "_gather_bwd_kernel")
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(3, 12, D, generator=gen, requires_grad=True)
    idx = ragged_idx([1, 12, 11], 12, gen, repeats=True)  # T = 24
    out = gather_tokens(x, idx)
    assert torch.equal(out, plain_gather(x.detach(), idx))
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    torch.testing.assert_close(x.grad.double(), plain_gather_grad(g, idx, (3, 12, D)), atol=1e-6, rtol=1e-6)
    expected_grid = (-(-24 // blocks[0]), -(-D // blocks[1]))
    assert fwd == [expected_grid] and bwd == [expected_grid]
