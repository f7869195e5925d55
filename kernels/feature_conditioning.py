"""IWM feature conditioning of the predictor's mask tokens (docs/method.md, "Feature conditioning").

Each target token's mask token (after its positional embedding) is concatenated with the action
``a_{x->y}`` of its sample and mapped back to the predictor width by a 3-layer MLP applied per token
(a 1x1-conv network), exact (erf) GELU between layers::

    z   = cat([mask_token + pos_embed[target_pos], action[token_batch]], -1)     # [T, D + A]
    out = fc3(gelu(fc2(gelu(fc1(z)))))                                           # [T, Dout]

What the Triton version fuses: fc1 is linear, so its token part only depends on the POSITION:
``P = (mask_token + pos_embed) @ w1[:, :D].T + b1`` is computed once per position (``[N, H]``, one small
matmul, N = patches << T = target tokens of the batch). One kernel then, per block of tokens, gathers
``P[target_pos]``, adds ``action[token_batch] @ w1[:, D:].T`` (A FMAs per output, fp32; A is the action's
width, ``views.action_dim``: 8 columns with a fixed jitter order, 12 with a random one) and applies
the GELU. fc2 and fc3 stay cuBLAS matmuls (F.linear). The backward recomputes fc1 with the same kernel,
which also applies the GELU derivative and reduces fc1's gradients (w.r.t. P, b1, w1's action
columns and the action) with fp32 atomics, so neither fc1's pre-activation nor its gradient ``[T, H]``
is ever stored.

What it saves: the reference materialises ``[T, D]`` tok, the ``[T, D+A]`` concatenation, a ``[T, D+A]x
[D+A, H]`` matmul (T/N times more fc1 FLOPs than needed) and keeps for backward z, fc1's output, its
GELU, fc2's output and its GELU (five ``[T, ~H]`` tensors). The fused version keeps only fc2's
pre-activation ``[T, H]`` and ``P [N, H]``; fc1 / gelu1 / gelu2 outputs are recomputed in backward.
(The atomics make the fc1 gradients' summation order, hence their last bits, run-dependent.)

Reference: :func:`feature_conditioning_reference` (torch.cat, F.linear, F.gelu).

Autocast: the Function runs under ``torch.amp.custom_fwd/custom_bwd`` (CUDA), so fc2/fc3 and P run in
the autocast dtype like the reference; the fused fc1 action term and the GELU are computed in fp32.
Gradients are returned in each input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Tiles, triton_available, use_triton

__all__ = ["feature_conditioning", "feature_conditioning_reference", "FeatureConditioningFunction"]


def feature_conditioning_reference(
    mask_token: Tensor, pos_embed: Tensor, target_pos: Tensor, action: Tensor, token_batch: Tensor,
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
) -> Tensor:
    """Plain PyTorch: ``fc3(gelu(fc2(gelu(fc1(cat([mask_token + pos_embed[target_pos],
    action[token_batch]], -1))))))`` -> ``[T, Dout]``."""
    tok = mask_token + pos_embed[target_pos]          # [T, D]
    z = torch.cat([tok, action[token_batch]], dim=-1)  # [T, D + A]
    h = F.gelu(F.linear(z, w1, b1))                    # [T, H]
    h = F.gelu(F.linear(h, w2, b2))                    # [T, H]
    return F.linear(h, w3, b3)                         # [T, Dout]


# ----------------------------------------------------------------------------------------------------
# Triton kernels: fc1 (gathered per-position part + action part) + exact GELU, and its backward
# ----------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _fc1_preact(P_ptr, pos, bat, act_ptr, wa_ptr, cols, row_ok, col_ok, mask, stride_P, stride_act,
                    stride_wa, A: tl.constexpr):
        """h1 = P[pos] + sum_a action[bat, a] * w1[:, D + a]   ([BLOCK_T, BLOCK_H], fp32)."""
        h = tl.load(P_ptr + pos[:, None] * stride_P + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        for a in tl.static_range(A):
            act = tl.load(act_ptr + bat * stride_act + a, mask=row_ok, other=0.0).to(tl.float32)
            w = tl.load(wa_ptr + cols * stride_wa + a, mask=col_ok, other=0.0).to(tl.float32)
            h += act[:, None] * w[None, :]
        return h

    @triton.jit
    def _fc1_gelu_fwd_kernel(
        P_ptr, pos_ptr, act_ptr, bat_ptr, wa_ptr, out_ptr,
        T, H, stride_P, stride_act, stride_wa, stride_out,
        A: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """out[t] = gelu(P[pos[t]] + action[bat[t]] @ w1[:, D:].T), exact GELU, fp32 math."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < T
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        bat = tl.load(bat_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        h = _fc1_preact(P_ptr, pos, bat, act_ptr, wa_ptr, cols, row_ok, col_ok, mask,
                        stride_P, stride_act, stride_wa, A)
        a1 = h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
                 a1.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fc1_gelu_bwd_kernel(
        P_ptr, pos_ptr, act_ptr, bat_ptr, wa_ptr, ga_ptr, a1_ptr, gP_ptr, gb1_ptr, gwa_ptr, gact_ptr,
        T, H, stride_P, stride_act, stride_wa, stride_ga, stride_a1, stride_gP,
        A: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
        NEED_P: tl.constexpr, NEED_B1: tl.constexpr, NEED_WA: tl.constexpr, NEED_ACT: tl.constexpr,
    ):
        """Recompute h1 and a1 = gelu(h1) (a1 is written: fc2's weight gradient needs it), turn
        g_a1 into g_h1 = g_a1 * gelu'(h1) in registers and reduce it straight into the fc1 gradients
        with fp32 atomics: gP[pos] += g_h1 (N x H, stays in L2), gb1 += sum_t g_h1,
        gwa[:, a] += sum_t g_h1 * action[bat, a], gact[t, a] += sum_h g_h1 * w1[h, D + a].
        g_h1 [T, H] never reaches memory."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < T
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        bat = tl.load(bat_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        h = _fc1_preact(P_ptr, pos, bat, act_ptr, wa_ptr, cols, row_ok, col_ok, mask,
                        stride_P, stride_act, stride_wa, A)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        rows64 = rows.to(tl.int64)
        tl.store(a1_ptr + rows64[:, None] * stride_a1 + cols[None, :],
                 (h * cdf).to(a1_ptr.dtype.element_ty), mask=mask)
        g = tl.load(ga_ptr + rows64[:, None] * stride_ga + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # standard normal density
        gh = tl.where(mask, g * (cdf + h * pdf), 0.0)
        if NEED_P:
            tl.atomic_add(gP_ptr + pos[:, None] * stride_gP + cols[None, :], gh, mask=mask)
        if NEED_B1:
            tl.atomic_add(gb1_ptr + cols, tl.sum(gh, axis=0), mask=col_ok)
        for a in tl.static_range(A):
            if NEED_WA:
                act = tl.load(act_ptr + bat * stride_act + a, mask=row_ok, other=0.0).to(tl.float32)
                tl.atomic_add(gwa_ptr + cols * A + a, tl.sum(gh * act[:, None], axis=0), mask=col_ok)
            if NEED_ACT:
                w = tl.load(wa_ptr + cols * stride_wa + a, mask=col_ok, other=0.0).to(tl.float32)
                tl.atomic_add(gact_ptr + rows64 * A + a, tl.sum(gh * w[None, :], axis=1), mask=row_ok)


def _fwd_launch(P, target_pos, action, token_batch, wa, out, tiles: Tiles):
    """Grid, arguments, meta-parameters of ``_fc1_gelu_fwd_kernel`` (real tensors or :mod:`kernels.aot`
    stand-ins). ``wa`` is ``w1[:, D:]``, a view with row stride ``D + A``."""
    T, H, A = target_pos.shape[0], P.shape[1], action.shape[1]
    grid = (triton.cdiv(T, tiles.block_t), triton.cdiv(H, tiles.block_d))
    args = (P, target_pos, action, token_batch, wa, out,
            T, H, P.stride()[0], action.stride()[0], wa.stride()[0], out.stride()[0])
    return grid, args, dict(A=A, BLOCK_T=tiles.block_t, BLOCK_H=tiles.block_d, num_warps=tiles.num_warps)


def _bwd_launch(P, target_pos, action, token_batch, wa, g_a1, a1, gP, gb1, gwa, gact, tiles: Tiles):
    """Grid, arguments, meta-parameters of ``_fc1_gelu_bwd_kernel``; a None gradient is not computed
    (its NEED_* flag is off and ``a1`` stands in for the pointer, never touched)."""
    T, H, A = target_pos.shape[0], P.shape[1], action.shape[1]
    grid = (triton.cdiv(T, tiles.block_t), triton.cdiv(H, tiles.block_d))
    some = lambda g: a1 if g is None else g  # noqa: E731
    args = (P, target_pos, action, token_batch, wa, g_a1, a1, some(gP), some(gb1), some(gwa), some(gact),
            T, H, P.stride()[0], action.stride()[0], wa.stride()[0], g_a1.stride()[0], a1.stride()[0],
            0 if gP is None else gP.stride()[0])
    meta = dict(A=A, BLOCK_T=tiles.block_t, BLOCK_H=tiles.block_d, NEED_P=gP is not None,
                NEED_B1=gb1 is not None, NEED_WA=gwa is not None, NEED_ACT=gact is not None,
                num_warps=tiles.num_warps)
    return grid, args, meta


def _fc1_gelu_fwd(P: Tensor, target_pos: Tensor, action: Tensor, token_batch: Tensor, w1: Tensor,
                  D: int) -> Tensor:
    """a1 = gelu(P[target_pos] + action[token_batch] @ w1[:, D:].T)  -> [T, H] in P's dtype."""
    T, H = target_pos.numel(), P.shape[1]
    out = torch.empty((T, H), dtype=P.dtype, device=P.device)
    if T > 0:
        wa = w1[:, D:]  # a view: data_ptr includes the column offset; stride(1) == 1 (w1 contiguous)
        grid, args, meta = _fwd_launch(P, target_pos, action, token_batch, wa, out,
                                       dispatch.tiles("feature_conditioning", H, P.is_cuda))
        _fc1_gelu_fwd_kernel[grid](*args, **meta)
    return out


def _fc1_gelu_bwd(P: Tensor, target_pos: Tensor, action: Tensor, token_batch: Tensor, w1: Tensor, D: int,
                  g_a1: Tensor, need_P: bool, need_b1: bool, need_wa: bool, need_act: bool):
    """Returns a1 [T, H] (P's dtype) and fp32 gP [N, H], gb1 [H], gwa [H, A], gact [T, A] (None where
    not needed)."""
    T, H, A = target_pos.numel(), P.shape[1], action.shape[1]
    dev = P.device
    a1 = torch.empty((T, H), dtype=P.dtype, device=dev)
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)  # noqa: E731
    gP = zeros(P.shape[0], H) if need_P else None
    gb1 = zeros(H) if need_b1 else None
    gwa = zeros(H, A) if need_wa else None
    gact = zeros(T, A) if need_act else None
    if T > 0:
        grid, args, meta = _bwd_launch(P, target_pos, action, token_batch, w1[:, D:], g_a1, a1, gP, gb1, gwa,
                                       gact, dispatch.tiles("feature_conditioning", H, P.is_cuda))
        _fc1_gelu_bwd_kernel[grid](*args, **meta)
    return a1, gP, gb1, gwa, gact


def aot_launches(shapes) -> list:
    """The launches a training step makes at ``shapes`` (:class:`kernels.specs.Shapes`): fc1 forward and
    backward at the predictor width (backward: the weights' gradients, the action being data; and every
    gradient, action included), with ``P``, g_a1 and a1 in each activation dtype; action, w1 (fp32
    parameters under autocast) and the gradients fp32."""
    from kernels import specs

    T, N, H, A, B = (shapes.target_tokens, shapes.patches, shapes.pred_width, shapes.action_dim,
                     shapes.batch)
    tiles = dispatch.TILE_POLICIES["feature_conditioning"]["cuda"].tiles(H)
    f32, i64 = torch.float32, torch.int64
    out = []
    for dt in specs.ACTIVATION_DTYPES:
        P, pos, bat, act = specs.mock(dt, N, H), specs.mock(i64, T), specs.mock(i64, T), specs.mock(f32, B, A)
        wa = specs.mock(f32, H, H + A)  # w1[:, D:] has w1's row stride D + A (D = H in the predictor)
        _, args, meta = _fwd_launch(P, pos, act, bat, wa, specs.mock(dt, T, H), tiles)
        out.append(specs.Launch(_fc1_gelu_fwd_kernel, args, meta, dtype=specs.dtype_name(dt), tiles=tiles))
        for variant, need in (("weight grads", (True, True, True, False)), ("all grads", (True, True, True, True))):
            grads = [specs.mock(f32, *shape) if n else None
                     for n, shape in zip(need, ((N, H), (H,), (H, A), (T, A)))]
            _, args, meta = _bwd_launch(P, pos, act, bat, wa, specs.mock(dt, T, H), specs.mock(dt, T, H), *grads, tiles)
            out.append(specs.Launch(_fc1_gelu_bwd_kernel, args, meta, dtype=specs.dtype_name(dt), tiles=tiles,
                                  variant=variant))
    return out


def check_cases(shapes, dtype: torch.dtype, device) -> list:
    """The conditioning MLP at ``shapes`` (:class:`kernels.specs.Shapes`), forward and every gradient, for
    ``make gpu-check`` (:class:`kernels.specs.CheckCase`). fp32 parameters as in the engine; bf16 means
    under ``torch.autocast`` (what a bf16 training step runs)."""
    import contextlib

    from kernels import specs

    gen = torch.Generator().manual_seed(2)
    N, H, A, B = shapes.patches, shapes.pred_width, shapes.action_dim, shapes.batch
    _, pos, sample = specs.packed_indices(B, N, shapes.target_tokens, gen, device)
    T = pos.numel()

    def p(*shape, s=0.02):
        return specs.randn(gen, *shape, device=device, scale=s, grad=True)

    mt, pe, act = p(H), p(N, H, s=1.0), p(B, A, s=1.0)
    w1, b1, w2, b2, w3, b3 = p(H, H + A), p(H), p(H, H), p(H), p(H, H), p(H)
    leaves = [mt, pe, act, w1, b1, w2, b2, w3, b3]
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def forward():
        with autocast:
            return feature_conditioning(mt, pe, pos, act, sample, w1, b1, w2, b2, w3, b3)

    return [specs.CheckCase("feature_conditioning", "autocast" if dtype != torch.float32 else "fp32",
                            f"T={T} N={N} D=H={H} A={A}", forward, leaves,
                            bytes_args=dict(B=B, N=N, D=H, T=T, A=A, act=torch.tensor([], dtype=dtype).element_size()))]


class FeatureConditioningFunction(torch.autograd.Function):
    """Fused fc1 (per-position precompute + gather + action FMA + GELU); fc2/fc3 via F.linear.
    Saves ``P [N, H]`` and fc2's pre-activation ``[T, H]``; recomputes the rest in backward, where one
    kernel also reduces fc1's gradient (g_h1 never materialised)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, mask_token, pos_embed, target_pos, action, token_batch, w1, b1, w2, b2, w3, b3):
        D = mask_token.shape[-1]
        w1 = w1.contiguous()
        target_pos = target_pos.reshape(-1).contiguous()
        token_batch = token_batch.reshape(-1).contiguous()
        action = action.contiguous()
        e = mask_token + pos_embed                       # [N, D]
        P = F.linear(e, w1[:, :D], b1).contiguous()      # [N, H] (autocast dtype under autocast)
        a1 = _fc1_gelu_fwd(P, target_pos, action, token_batch, w1, D)
        h2 = F.linear(a1, w2, b2)                        # [T, H]
        out = F.linear(F.gelu(h2), w3, b3)               # [T, Dout]
        ctx.save_for_backward(mask_token, pos_embed, target_pos, action, token_batch, w1, w2, w3, P, h2)
        ctx.dtypes = [t.dtype for t in (mask_token, pos_embed, action, w1, b1, w2, b2, w3, b3)]
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_out):
        mask_token, pos_embed, target_pos, action, token_batch, w1, w2, w3, P, h2 = ctx.saved_tensors
        dt_mask, dt_pos, dt_act, dt_w1, dt_b1, dt_w2, dt_b2, dt_w3, dt_b3 = ctx.dtypes
        need = ctx.needs_input_grad  # (mask_token, pos_embed, target_pos, action, token_batch, w1, ...)
        D = mask_token.shape[-1]
        cdt = h2.dtype  # compute dtype of fc2/fc3 (autocast dtype or the inputs' dtype)
        g_out = g_out.to(cdt)
        # fc3
        a2 = F.gelu(h2)
        gw3 = g_out.t().matmul(a2) if need[9] else None
        gb3 = g_out.sum(0) if need[10] else None
        g_h2 = torch.ops.aten.gelu_backward(g_out.matmul(w3.to(cdt)), h2, approximate="none")
        # fc2 and fc1: one kernel recomputes a1 and reduces fc1's gradients
        gb2 = g_h2.sum(0) if need[8] else None
        g_a1 = g_h2.matmul(w2.to(cdt)).contiguous()
        need_P = need[0] or need[1] or need[5]
        a1, gP, gb1, gwa, gact = _fc1_gelu_bwd(P, target_pos, action, token_batch, w1, D, g_a1,
                                               need_P=need_P, need_b1=need[6], need_wa=need[5],
                                               need_act=need[3])
        gw2 = g_h2.t().matmul(a1) if need[7] else None
        g_action = gw1 = g_pos = g_mask = None
        if need[3]:
            g_action = torch.zeros(action.shape, dtype=torch.float32, device=action.device)
            g_action.index_add_(0, token_batch, gact)
        # per-position part P = (mask_token + pos_embed) @ w1[:, :D].T + b1   (N rows: small, fp32)
        with torch.autocast(device_type=P.device.type, enabled=False):
            if need[5]:
                e = (mask_token + pos_embed).float()
                gw1 = torch.cat([gP.t().matmul(e), gwa], dim=1)                   # [H, D + A]
            if need[0] or need[1]:
                g_e = gP.matmul(w1[:, :D].float())                                 # [N, D]
                g_pos = g_e if need[1] else None
                g_mask = g_e.sum(0).reshape(mask_token.shape) if need[0] else None

        def cast(t, dt):
            return None if t is None else t.to(dt)

        return (cast(g_mask, dt_mask), cast(g_pos, dt_pos), None, cast(g_action, dt_act), None,
                cast(gw1, dt_w1), cast(gb1, dt_b1), cast(gw2, dt_w2), cast(gb2, dt_b2),
                cast(gw3, dt_w3), cast(gb3, dt_b3))


def feature_conditioning(
    mask_token: Tensor, pos_embed: Tensor, target_pos: Tensor, action: Tensor, token_batch: Tensor,
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
) -> Tensor:
    """Feature-conditioned mask tokens ``[T, Dout]``.

    ``mask_token [D]``, ``pos_embed [N, D]``, ``target_pos [T]`` (patch index of each target token),
    ``action [B, A]``, ``token_batch [T]`` (sample of each target token), ``w1 [H, D+A]``, ``b1 [H]``,
    ``w2 [H, H]``, ``b2 [H]``, ``w3 [Dout, H]``, ``b3 [Dout]``. Differentiable w.r.t. all float inputs.
    Backend from :mod:`kernels.dispatch`.
    """
    D = mask_token.shape[-1]
    if pos_embed.dim() != 2 or pos_embed.shape[1] != D or w1.shape[1] != D + action.shape[-1]:
        raise ValueError(f"feature_conditioning: expected mask_token [D], pos_embed [N, D], action [B, A], "
                         f"w1 [H, D+A]; got {tuple(mask_token.shape)}, {tuple(pos_embed.shape)}, "
                         f"{tuple(action.shape)}, {tuple(w1.shape)}")
    if target_pos.shape != token_batch.shape:
        raise ValueError(f"feature_conditioning: target_pos {tuple(target_pos.shape)} and token_batch "
                         f"{tuple(token_batch.shape)} must both be [T]")
    if use_triton(mask_token, pos_embed, action, w1, w2, w3):
        return FeatureConditioningFunction.apply(mask_token, pos_embed, target_pos, action, token_batch,
                                                 w1, b1, w2, b2, w3, b3)
    return feature_conditioning_reference(mask_token, pos_embed, target_pos, action, token_batch,
                                          w1, b1, w2, b2, w3, b3)
