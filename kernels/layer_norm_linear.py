"""LayerNorm fused into the prologue of the linear projection that follows it (a ViT block's
``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``)::

    y = F.linear(F.layer_norm(x, (K,), ln_weight, ln_bias, eps), weight, bias)     # x [M, K] -> y [M, N]

What the Triton version fuses. Forward: one kernel per ``[BLOCK_M, BLOCK_N]`` tile of y computes its
rows' mean and rstd (two passes over the row in fp32: mean, then the centred variance, as
``torch.layer_norm``), then runs the matmul over K with the normalised, affine-transformed x tile made
in registers as the A operand (the "prologue"); it also writes the rows' mean and rstd (fp32, ``[M]``
each) for the backward. Backward: ``g_xn = g_y @ W`` stays a cuBLAS matmul; one kernel computes
``g_W = g_y^T @ LN(x)`` with the same prologue (LN(x) recomputed from x, mean, rstd) and folds the
bias gradient into its K-tile-0 programs; one kernel computes the LayerNorm backward
``g_x = rstd * (g_xhat - mean(g_xhat) - xhat * mean(g_xhat * xhat))`` (``g_xhat = g_xn * ln_weight``)
and reduces the LayerNorm weight / bias gradients with fp32 atomics (their last bits are then
run-dependent).

What it saves: the normalised activation ``LN(x) [M, K]`` is never written: the unfused pair writes it,
reads it back for the matmul, keeps it for the backward (the linear's weight gradient reads it) and
reads ``g_y`` once more for the bias gradient. Per block of a ViT that is two ``[M, K]`` activations
less memory and ``2 M K + M N`` fewer activation bytes moved per pair (``benchmarks/kernels_table.py``,
:func:`bytes_moved`).

Reference: :func:`layer_norm_linear_reference` (``F.layer_norm`` then ``F.linear``): exactly what timm's
``LayerNorm`` and ``nn.Linear`` compute, so the reference path (CPU, ``IWM_KERNELS=reference``) changes
no bit of a model's outputs.

Dtypes: the matmul operands are in the compute dtype (the autocast dtype under autocast, else x's
dtype) with fp32 accumulation; the statistics and the prologue are fp32; y is in the compute dtype,
as ``F.linear`` under autocast. fp32 operands use TF32 only where torch's
``torch.backends.cuda.matmul.allow_tf32`` allows it (the interpreter computes fp32 exactly).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Tiles, triton_available, use_triton

__all__ = ["layer_norm_linear", "layer_norm_linear_reference", "LayerNormLinearFunction"]



def reduction_block(target: str, dtype: torch.dtype) -> int:
    """The reduction block of the matmuls (K in the forward, M in the weight gradient): 32 for 16-bit
    operands on CUDA, 16 for fp32 (at 32 the fp32 weight gradient spilled: sm_80 2832 B, sm_90 464 B
    per thread), 64 on the interpreter (few, big steps)."""
    if target == "interpreter":
        return 64
    return 16 if dtype == torch.float32 else 32


def layer_norm_linear_reference(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                                weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch: ``F.linear(F.layer_norm(x, (K,), ln_weight, ln_bias, eps), weight, bias)``."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_stats(x_ptr, rows64, row_ok, K, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """mean and rstd of rows ``rows64`` of x [M, K] (fp32; biased variance of the centred rows)."""
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = row_ok[:, None] & (ks < K)[None, :]
            total += tl.sum(tl.load(x_ptr + rows64[:, None] * stride_x + ks[None, :], mask=m, other=0.0)
                            .to(tl.float32), axis=1)
        mean = total / K
        var = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = row_ok[:, None] & (ks < K)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_x + ks[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - mean[:, None], 0.0)
            var += tl.sum(d * d, axis=1)
        return mean, 1.0 / tl.sqrt(var / K + eps)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b. ``UPCAST`` (the interpreter only, whose tl.dot is wrong for 16-bit operands):
        multiply the operands' values (already rounded to their dtype) in fp32, as tensor cores do."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _normalised_tile(x_ptr, lnw_ptr, lnb_ptr, rows64, ks, m, k_ok, mean, rstd, stride_x,
                         HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
        """LN(x) on one [rows, ks] tile, fp32, zero outside the mask ``m``."""
        x = tl.load(x_ptr + rows64[:, None] * stride_x + ks[None, :], mask=m, other=0.0).to(tl.float32)
        xn = (x - mean[:, None]) * rstd[:, None]
        if HAS_LNW:
            xn = xn * tl.load(lnw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LNB:
            xn = xn + tl.load(lnb_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        return tl.where(m, xn, 0.0)

    @triton.jit
    def _ln_linear_fwd_kernel(
        x_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
        M, N, K, stride_x, stride_w, stride_y, eps,
        HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """y[rows, cols] = LN(x[rows]) @ W[cols].T + b[cols]; the pid_n == 0 programs write mean, rstd."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        rows64 = rows.to(tl.int64)
        mean, rstd = _row_stats(x_ptr, rows64, row_ok, K, stride_x, eps, BLOCK_M, BLOCK_K)
        if pid_n == 0:
            tl.store(mean_ptr + rows, mean, mask=row_ok)
            tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xn = _normalised_tile(x_ptr, lnw_ptr, lnb_ptr, rows64, ks, row_ok[:, None] & k_ok[None, :], k_ok,
                                  mean, rstd, stride_x, HAS_LNW, HAS_LNB)
            wt = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None],  # W^T tile [BLOCK_K, BLOCK_N]
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(xn.to(wt.dtype), wt, acc, PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _ln_linear_dw_kernel(
        x_ptr, lnw_ptr, lnb_ptr, mean_ptr, rstd_ptr, gy_ptr, gw_ptr, gb_ptr,
        M, N, K, stride_x, stride_gy, stride_gw,
        HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, NEED_B: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """g_W[cols, ks] = sum_m g_y[m, cols] * LN(x)[m, ks] (LN(x) recomputed); the K-tile-0 programs
        also write g_b[cols] = sum_m g_y[m, cols]. fp32 outputs."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok, k_ok = cols < N, ks < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            gyt = tl.load(gy_ptr + rows64[None, :] * stride_gy + cols[:, None],  # g_y^T tile [BLOCK_N, BLOCK_M]
                          mask=col_ok[:, None] & row_ok[None, :], other=0.0)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xn = _normalised_tile(x_ptr, lnw_ptr, lnb_ptr, rows64, ks, row_ok[:, None] & k_ok[None, :], k_ok,
                                  mean, rstd, stride_x, HAS_LNW, HAS_LNB)
            acc = _dot(gyt, xn.to(gyt.dtype), acc, PRECISION, UPCAST)
            if NEED_B:
                acc_b += tl.sum(gyt.to(tl.float32), axis=1)
        tl.store(gw_ptr + cols[:, None].to(tl.int64) * stride_gw + ks[None, :], acc,
                 mask=col_ok[:, None] & k_ok[None, :])
        if NEED_B:
            tl.store(gb_ptr + cols, acc_b, mask=col_ok & (pid_k == 0))

    @triton.jit
    def _ln_bwd_kernel(
        x_ptr, lnw_ptr, mean_ptr, rstd_ptr, gxn_ptr, gx_ptr, glnw_ptr, glnb_ptr,
        M, K, stride_x, stride_gxn, stride_gx,
        HAS_LNW: tl.constexpr, NEED_X: tl.constexpr, NEED_LNW: tl.constexpr, NEED_LNB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """LayerNorm backward from g_xn = dL/dLN(x): g_x [M, K] (x's dtype) and fp32 atomics into
        g_lnw[k] += sum_m g_xn * xhat, g_lnb[k] += sum_m g_xn."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_k g_xhat
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_k g_xhat * xhat
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            m = row_ok[:, None] & k_ok[None, :]
            xhat = _normalised_tile(x_ptr, lnw_ptr, lnw_ptr, rows64, ks, m, k_ok, mean, rstd, stride_x, False, False)
            g = tl.load(gxn_ptr + rows64[:, None] * stride_gxn + ks[None, :], mask=m, other=0.0).to(tl.float32)
            if NEED_LNW:
                tl.atomic_add(glnw_ptr + ks, tl.sum(g * xhat, axis=0), mask=k_ok)
            if NEED_LNB:
                tl.atomic_add(glnb_ptr + ks, tl.sum(g, axis=0), mask=k_ok)
            if HAS_LNW:
                g = g * tl.load(lnw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            c1 += tl.sum(g, axis=1)
            c2 += tl.sum(g * xhat, axis=1)
        c1, c2 = c1 / K, c2 / K
        if NEED_X:
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                m = row_ok[:, None] & k_ok[None, :]
                xhat = _normalised_tile(x_ptr, lnw_ptr, lnw_ptr, rows64, ks, m, k_ok, mean, rstd, stride_x,
                                        False, False)
                g = tl.load(gxn_ptr + rows64[:, None] * stride_gxn + ks[None, :], mask=m, other=0.0).to(tl.float32)
                if HAS_LNW:
                    g = g * tl.load(lnw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                gx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                tl.store(gx_ptr + rows64[:, None] * stride_gx + ks[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------
# Launch builders (real tensors or kernels.specs mocks) and launchers
# ----------------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 operands take TF32 only where torch's matmul setting allows it."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _fwd_launch(x, lnw, lnb, w, b, y, mean, rstd, eps: float, tiles: Tiles, block_k: int, upcast: bool = False):
    M, K, N = x.shape[0], x.shape[1], w.shape[0]
    grid = (triton.cdiv(M, tiles.block_t), triton.cdiv(N, tiles.block_d))
    args = (x, lnw if lnw is not None else x, lnb if lnb is not None else x, w, b if b is not None else w, y,
            mean, rstd, M, N, K, x.stride()[0], w.stride()[0], y.stride()[0], float(eps))
    meta = dict(HAS_LNW=lnw is not None, HAS_LNB=lnb is not None, HAS_BIAS=b is not None,
                BLOCK_M=tiles.block_t, BLOCK_N=tiles.block_d, BLOCK_K=block_k, PRECISION=_precision(w.dtype),
                UPCAST=upcast, num_warps=tiles.num_warps)
    return grid, args, meta


def _dw_launch(x, lnw, lnb, mean, rstd, gy, gw, gb, tiles: Tiles, block_m: int, upcast: bool = False):
    """``tiles``: block_t = the N tile (rows of g_W), block_d = the K tile."""
    M, K, N = x.shape[0], x.shape[1], gy.shape[1]
    grid = (triton.cdiv(N, tiles.block_t), triton.cdiv(K, tiles.block_d))
    args = (x, lnw if lnw is not None else x, lnb if lnb is not None else x, mean, rstd, gy, gw,
            gb if gb is not None else gw, M, N, K, x.stride()[0], gy.stride()[0], gw.stride()[0])
    meta = dict(HAS_LNW=lnw is not None, HAS_LNB=lnb is not None, NEED_B=gb is not None, BLOCK_N=tiles.block_t,
                BLOCK_K=tiles.block_d, BLOCK_M=block_m, PRECISION=_precision(gy.dtype), UPCAST=upcast,
                num_warps=tiles.num_warps)
    return grid, args, meta


def _ln_bwd_launch(x, lnw, mean, rstd, gxn, gx, glnw, glnb, tiles: Tiles):
    M, K = x.shape
    some = lambda t: mean if t is None else t  # noqa: E731  (a pointer never touched)
    grid = (triton.cdiv(M, tiles.block_t),)
    args = (x, some(lnw), mean, rstd, gxn, some(gx), some(glnw), some(glnb), M, K, x.stride()[0],
            gxn.stride()[0], 0 if gx is None else gx.stride()[0])
    meta = dict(HAS_LNW=lnw is not None, NEED_X=gx is not None, NEED_LNW=glnw is not None,
                NEED_LNB=glnb is not None, BLOCK_M=tiles.block_t, BLOCK_K=tiles.block_d, num_warps=tiles.num_warps)
    return grid, args, meta


def _tiles(op: str, D: int, on_cuda: bool, dtype: torch.dtype):
    return dispatch.tiles(op, D, on_cuda), reduction_block(dispatch.tile_target(on_cuda), dtype)


def _ln_linear_fwd(x: Tensor, lnw, lnb, w: Tensor, b, eps: float):
    """y [M, N] (w's dtype), mean [M], rstd [M] (fp32)."""
    M, N = x.shape[0], w.shape[0]
    y = torch.empty((M, N), dtype=w.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        tiles, block_k = _tiles("layer_norm_linear", N, x.is_cuda, w.dtype)
        grid, args, meta = _fwd_launch(x, lnw, lnb, w, b, y, mean, rstd, eps, tiles, block_k,
                                       upcast=dispatch.interpreter_enabled())
        _ln_linear_fwd_kernel[grid](*args, **meta)
    return y, mean, rstd


def _ln_linear_dw(x, lnw, lnb, mean, rstd, gy, need_b: bool):
    """fp32 g_W [N, K] and g_b [N] (None unless ``need_b``)."""
    N, K = gy.shape[1], x.shape[1]
    gw = torch.empty((N, K), dtype=torch.float32, device=x.device)
    gb = torch.empty(N, dtype=torch.float32, device=x.device) if need_b else None
    if x.shape[0] == 0:
        gw.zero_()
        return gw, (gb.zero_() if need_b else None)
    tiles, block_m = _tiles("layer_norm_linear_dw", K, x.is_cuda, gy.dtype)
    grid, args, meta = _dw_launch(x, lnw, lnb, mean, rstd, gy, gw, gb, tiles, block_m,
                                  upcast=dispatch.interpreter_enabled())
    _ln_linear_dw_kernel[grid](*args, **meta)
    return gw, gb


def _ln_bwd(x, lnw, mean, rstd, gxn, need_x: bool, need_lnw: bool, need_lnb: bool):
    """g_x [M, K] (x's dtype) and fp32 g_lnw, g_lnb [K] (None where not needed)."""
    M, K = x.shape
    gx = torch.empty_like(x) if need_x else None
    glnw = torch.zeros(K, dtype=torch.float32, device=x.device) if need_lnw else None
    glnb = torch.zeros(K, dtype=torch.float32, device=x.device) if need_lnb else None
    if M > 0 and (need_x or need_lnw or need_lnb):
        grid, args, meta = _ln_bwd_launch(x, lnw, mean, rstd, gxn, gx, glnw, glnb,
                                          dispatch.tiles("layer_norm_backward", K, x.is_cuda))
        _ln_bwd_kernel[grid](*args, **meta)
    return gx, glnw, glnb


def aot_launches(shapes) -> list:
    """The launches a training step makes at ``shapes`` (:class:`kernels.specs.Shapes`): LN -> QKV
    (N = 3 D) and LN -> fc1 (N = 4 D) of the encoder's blocks (context tokens, and the target encoder's
    whole images: its forward only) and of the predictor's (context + target tokens), forward, weight
    gradient (with the bias's) and LayerNorm backward, activations in each dtype, LayerNorm parameters
    fp32 (under autocast) and the gradients fp32."""
    from kernels import specs

    f32 = torch.float32
    widths = {shapes.enc_width, shapes.pred_width}
    M = max(shapes.context_tokens, shapes.batch * shapes.patches, shapes.context_tokens + shapes.target_tokens)
    out = []
    for dt in specs.ACTIVATION_DTYPES:
        name = specs.dtype_name(dt)
        for K in sorted(widths):
            x, mean, rstd, lnp = specs.mock(dt, M, K), specs.mock(f32, M), specs.mock(f32, M), specs.mock(f32, K)
            for N in (3 * K, 4 * K):  # QKV, fc1 (the same specialisation where the tiles agree: compiled once)
                tiles = dispatch.TILE_POLICIES["layer_norm_linear"]["cuda"].tiles(N)
                _, args, meta = _fwd_launch(x, lnp, lnp, specs.mock(dt, N, K), specs.mock(f32, N),
                                            specs.mock(dt, M, N), mean, rstd, 1e-6, tiles, reduction_block("cuda", dt))
                out.append(specs.Launch(_ln_linear_fwd_kernel, args, meta, dtype=name, tiles=tiles))
                tiles = dispatch.TILE_POLICIES["layer_norm_linear_dw"]["cuda"].tiles(K)
                _, args, meta = _dw_launch(x, lnp, lnp, mean, rstd, specs.mock(dt, M, N), specs.mock(f32, N, K),
                                           specs.mock(f32, N), tiles, reduction_block("cuda", dt))
                out.append(specs.Launch(_ln_linear_dw_kernel, args, meta, dtype=name, tiles=tiles))
            tiles = dispatch.TILE_POLICIES["layer_norm_backward"]["cuda"].tiles(K)
            _, args, meta = _ln_bwd_launch(x, lnp, mean, rstd, specs.mock(dt, M, K), specs.mock(dt, M, K), lnp, lnp,
                                           tiles)
            out.append(specs.Launch(_ln_bwd_kernel, args, meta, dtype=name, tiles=tiles))
    return out


def check_cases(shapes, dtype: torch.dtype, device) -> list:
    """LN -> QKV of an encoder block over the context tokens and LN -> fc1 of a predictor block over its
    context + target tokens, at ``shapes`` (:class:`kernels.specs.Shapes`), forward and every gradient, for
    ``make gpu-check`` (:class:`kernels.specs.CheckCase`). fp32 parameters as in the engine; bf16 means
    under ``torch.autocast``. Compute-bound (a matmul): no GB/s."""
    import contextlib

    from kernels import specs

    gen = torch.Generator().manual_seed(3)
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    cases = []
    for variant, M, K, N in (("encoder QKV", shapes.context_tokens, shapes.enc_width, 3 * shapes.enc_width),
                             ("predictor fc1", shapes.context_tokens + shapes.target_tokens, shapes.pred_width,
                              4 * shapes.pred_width)):
        x = specs.randn(gen, M, K, device=device, grad=True)
        lnw, lnb = (specs.randn(gen, K, device=device, scale=0.5, grad=True) for _ in range(2))
        w = specs.randn(gen, N, K, device=device, scale=K ** -0.5, grad=True)
        b = specs.randn(gen, N, device=device, scale=0.1, grad=True)

        def forward(x=x, lnw=lnw, lnb=lnb, w=w, b=b):
            with autocast:
                return layer_norm_linear(x, lnw, lnb, 1e-6, w, b)

        cases.append(specs.CheckCase("layer_norm_linear", variant + (" autocast" if dtype != torch.float32 else ""),
                                     f"x[{M},{K}] -> LN -> [{M},{N}]", forward, [x, lnw, lnb, w, b]))
    return cases


# ----------------------------------------------------------------------------------------------------
# autograd.Function and the public op
# ----------------------------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype where autocast is on for x's device, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LayerNormLinearFunction(torch.autograd.Function):
    """LN -> linear with LN in the matmul's prologue. Saves x, the rows' mean and rstd (fp32), the
    LayerNorm parameters and the weight (in the compute dtype); LN(x) is recomputed in backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias):
        K, N = x.shape[-1], weight.shape[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K).contiguous()
        w = weight.to(_compute_dtype(x)).contiguous()
        y, mean, rstd = _ln_linear_fwd(x2, ln_weight, ln_bias, w, bias, eps)
        ctx.save_for_backward(x2, ln_weight, ln_bias, w, mean, rstd)
        ctx.meta = (lead, [None if t is None else t.dtype for t in (ln_weight, ln_bias, weight, bias)])
        return y.view(*lead, N)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_y):
        x, ln_weight, ln_bias, w, mean, rstd = ctx.saved_tensors
        lead, (dt_lnw, dt_lnb, dt_w, dt_b) = ctx.meta
        need_x, need_lnw, need_lnb, _, need_w, need_b = ctx.needs_input_grad
        g_y = g_y.reshape(-1, w.shape[0]).to(w.dtype).contiguous()
        gw = gb = None
        if need_w or need_b:
            gw, gb = _ln_linear_dw(x, ln_weight, ln_bias, mean, rstd, g_y, need_b)
            gw = gw if need_w else None
        gx = glnw = glnb = None
        if need_x or need_lnw or need_lnb:
            g_xn = g_y.matmul(w)  # [M, K], cuBLAS
            gx, glnw, glnb = _ln_bwd(x, ln_weight, mean, rstd, g_xn, need_x, need_lnw and ln_weight is not None,
                                     need_lnb and ln_bias is not None)

        def cast(t, dt):
            return None if t is None else t.to(dt)

        return (None if gx is None else gx.view(*lead, x.shape[1]), cast(glnw, dt_lnw), cast(glnb, dt_lnb), None,
                cast(gw, dt_w), cast(gb, dt_b))


def layer_norm_linear(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                      weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(F.layer_norm(x, (K,), ln_weight, ln_bias, eps), weight, bias)`` -> ``[..., N]``.

    ``x [..., K]``, ``ln_weight``, ``ln_bias [K]`` (or None), ``weight [N, K]``, ``bias [N]`` (or None).
    Differentiable w.r.t. every tensor. Backend from :mod:`kernels.dispatch`: the fused Triton kernels,
    or the reference (on CPU: exactly timm's ``LayerNorm`` + ``nn.Linear``).
    """
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"layer_norm_linear: expected x [..., K] and weight [N, K]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    for name, t, n in (("ln_weight", ln_weight, K), ("ln_bias", ln_bias, K), ("bias", bias, weight.shape[0])):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"layer_norm_linear: {name} must be [{n}], got {tuple(t.shape)}")
    if use_triton(x, ln_weight, ln_bias, weight, bias):
        return _fused_eager(x, ln_weight, ln_bias, eps, weight, bias)
    return layer_norm_linear_reference(x, ln_weight, ln_bias, eps, weight, bias)


# Under torch.compile (train.compile) the fused op stays eager (a graph break, as the ragged attention): dynamo
# does not trace this Function's Triton launches; the reference path is traced and compiled.
_fused_eager = torch.compiler.disable(LayerNormLinearFunction.apply)
