"""Gather packed token rows: ``out[t] = x.reshape(B*N, D)[flat_idx[t]]``.

Used to pick the context tokens fed to the encoder and the target tokens fed to the loss. Ragged
per-sample index sets are packed by the caller: sample ``b``'s token ``n`` is row ``b*N + n``, so no
sample is truncated to the batch minimum (I-JEPA's issue #38) and no padding is gathered.

What the Triton version fuses / saves: little, honestly; a gather is a copy and
``torch.index_select`` is already one pass (read T rows, write T rows). The Triton forward is that same
pass; its backward, for fp32 ``x``, is one pass of fp32 ``atomic_add`` straight into the zero-filled
``[B, N, D]`` gradient (indices may repeat) instead of autograd's ``index_put_(accumulate=True)``, which
sorts the indices on CUDA first. For bf16/fp16 ``x`` the backward uses ``index_add_`` in the native
dtype (an fp32 atomic buffer would cost two extra ``[B, N, D]`` passes, zero-fill + cast, and the
engine's context indices never repeat). Nothing of size ``[T, D]`` is saved for backward, only
``flat_idx``. The op exists as a kernel so the packed layout has one code path on every backend.

Reference: :func:`gather_tokens_reference`, ``x.reshape(B*N, D)[flat_idx]`` in plain PyTorch.
Indices are not bounds-checked by the Triton kernel (an out-of-range index reads/writes out of
bounds); the reference raises IndexError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Tiles, triton_available, use_triton

__all__ = ["gather_tokens", "gather_tokens_reference", "GatherTokensFunction"]


def gather_tokens_reference(x: Tensor, flat_idx: Tensor) -> Tensor:
    """Plain PyTorch: rows of ``x.reshape(B*N, D)`` at ``flat_idx``. ``[B, N, D], [T] -> [T, D]``."""
    B, N, D = x.shape
    return x.reshape(B * N, D)[flat_idx]


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_fwd_kernel(
        x_ptr, idx_ptr, out_ptr, T, D, stride_x, stride_out,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program: BLOCK_T gathered rows x BLOCK_D columns
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols < D)[None, :]
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        v = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], v, mask=mask)

    @triton.jit
    def _gather_bwd_kernel(
        g_ptr, idx_ptr, gx_ptr, T, D, stride_g, stride_gx,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # scatter-add: gx[idx[t], :] += g[t, :] (fp32 atomics, so repeated indices accumulate)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols < D)[None, :]
        dst = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        tl.atomic_add(gx_ptr + dst[:, None] * stride_gx + cols[None, :], g.to(tl.float32), mask=mask)


def _launch(x2d, flat_idx, out, tiles: Tiles):
    """Grid, arguments and meta-parameters of one gather (forward) or scatter-add (backward) launch:
    ``x2d`` is the source ``[rows, D]`` (backward: the gradient ``[T, D]``), ``out`` the destination.
    Real tensors, or :mod:`kernels.aot` stand-ins when compiling ahead of time."""
    T, D = flat_idx.shape[0], x2d.shape[1]
    grid = (triton.cdiv(T, tiles.block_t), triton.cdiv(D, tiles.block_d))
    args = (x2d, flat_idx, out, T, D, x2d.stride()[0], out.stride()[0])
    return grid, args, dict(BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps)


def _gather_fwd(x2d: Tensor, flat_idx: Tensor) -> Tensor:
    T, D = flat_idx.numel(), x2d.shape[1]
    out = torch.empty((T, D), dtype=x2d.dtype, device=x2d.device)
    if T == 0:
        return out
    grid, args, meta = _launch(x2d, flat_idx, out, dispatch.tiles("gather_tokens", D, x2d.is_cuda))
    _gather_fwd_kernel[grid](*args, **meta)
    return out


def _gather_bwd(grad_out: Tensor, flat_idx: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    T, D = grad_out.shape
    if dtype != torch.float32:
        # native-dtype scatter-add (see module docstring); atomics on CUDA, like autograd's own
        gx = torch.zeros((rows, D), dtype=dtype, device=grad_out.device)
        return gx.index_add_(0, flat_idx, grad_out.to(dtype))
    gx = torch.zeros((rows, D), dtype=torch.float32, device=grad_out.device)
    if T > 0:
        grad_out = grad_out.contiguous()
        grid, args, meta = _launch(grad_out, flat_idx, gx, dispatch.tiles("gather_tokens", D, grad_out.is_cuda))
        _gather_bwd_kernel[grid](*args, **meta)
    return gx


def aot_launches(shapes) -> list:
    """The launches a training step makes at ``shapes`` (:class:`kernels.specs.Shapes`): the context
    gather at the encoder width in each activation dtype, and the fp32 scatter-add backward."""
    from kernels import specs

    T, D, rows = shapes.context_tokens, shapes.enc_width, shapes.batch * shapes.patches
    tiles = dispatch.TILE_POLICIES["gather_tokens"]["cuda"].tiles(D)
    out = []
    for dt in specs.ACTIVATION_DTYPES:
        _, args, meta = _launch(specs.mock(dt, rows, D), specs.mock(torch.int64, T), specs.mock(dt, T, D), tiles)
        out.append(specs.Launch(_gather_fwd_kernel, args, meta, dtype=specs.dtype_name(dt), tiles=tiles))
    _, args, meta = _launch(specs.mock(torch.float32, T, D), specs.mock(torch.int64, T),
                            specs.mock(torch.float32, rows, D), tiles)
    out.append(specs.Launch(_gather_bwd_kernel, args, meta, dtype="fp32", tiles=tiles))
    return out


def check_cases(shapes, dtype: torch.dtype, device) -> list:
    """The context gather at ``shapes`` (:class:`kernels.specs.Shapes`) in ``dtype``, forward and backward,
    for ``make gpu-check`` (:class:`kernels.specs.CheckCase`)."""
    from kernels import specs

    gen = torch.Generator().manual_seed(0)
    B, N, D, T = shapes.batch, shapes.patches, shapes.enc_width, shapes.context_tokens
    x = specs.randn(gen, B, N, D, dtype=dtype, device=device, grad=True)
    flat_idx, _, _ = specs.packed_indices(B, N, T, gen, device)
    return [specs.CheckCase("gather_tokens", "context", f"x[{B},{N},{D}] -> [{flat_idx.numel()},{D}]",
                            lambda: gather_tokens(x, flat_idx), [x],
                            bytes_args=dict(B=B, N=N, D=D, T=flat_idx.numel(), act=x.element_size()))]


class GatherTokensFunction(torch.autograd.Function):
    """Triton gather forward; scatter-add backward (Triton fp32 atomics, or ``index_add_`` for 16-bit
    dtypes). Saves only ``flat_idx``."""

    @staticmethod
    def forward(ctx, x: Tensor, flat_idx: Tensor) -> Tensor:
        B, N, D = x.shape
        flat_idx = flat_idx.reshape(-1).contiguous()
        ctx.save_for_backward(flat_idx)
        ctx.shape, ctx.dtype = (B, N, D), x.dtype
        return _gather_fwd(x.reshape(B * N, D).contiguous(), flat_idx)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (flat_idx,) = ctx.saved_tensors
        B, N, D = ctx.shape
        gx = _gather_bwd(grad_out, flat_idx, B * N, ctx.dtype).view(B, N, D)
        return gx, None


def gather_tokens(x: Tensor, flat_idx: Tensor) -> Tensor:
    """Rows of ``x.reshape(B*N, D)`` at ``flat_idx``: ``x [B, N, D]``, ``flat_idx [T]`` (int64, row
    ``b*N + n`` is sample b's token n) -> ``[T, D]``. Differentiable w.r.t. ``x`` (backward scatter-adds
    into zeros ``[B, N, D]``; indices may repeat). Backend from :mod:`kernels.dispatch`."""
    if x.dim() != 3:
        raise ValueError(f"gather_tokens: x must be [B, N, D], got shape {tuple(x.shape)}")
    if flat_idx.dim() != 1 or flat_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_tokens: flat_idx must be a 1-D integer tensor, got {flat_idx.dtype} "
                         f"of shape {tuple(flat_idx.shape)}")
    if use_triton(x, flat_idx):
        return GatherTokensFunction.apply(x, flat_idx)
    return gather_tokens_reference(x, flat_idx)
