"""IWM loss: squared L2 between predictions and layer-normalised target-encoder features.

``loss = mean((pred - LN(target.reshape(B*N, D)[flat_idx]))**2)`` over all ``T*D`` elements, in fp32,
where ``LN`` is ``F.layer_norm`` without affine parameters. ``target`` is the (stop-gradient) output of
the EMA target encoder for the target view y over all N patches; ``flat_idx`` packs the ragged target
positions (sample b's patch n is row ``b*N + n``). Gradient flows to ``pred`` only.

The loss of docs/method.md ("Loss"). What the Triton version fuses: gather of the target rows + fp32
layer norm + squared error + the reduction + the gradient, in ONE pass over ``pred`` and the gathered
target rows. Each program takes a
block of rows (whole rows, so the layer-norm statistics stay in registers), writes one partial sum (the
partials are summed in a fixed order: deterministic) and, when ``pred`` requires grad, writes
``d loss / d pred = 2 * (pred - t) / (T*D)`` right away; backward only scales it by ``grad_output``.

What it saves: the unfused composition materialises the gathered targets ``[T, D]`` (input dtype),
their fp32 copy, the normalised targets, the difference and its square (each ``[T, D]`` fp32, and
autograd keeps the difference alive until backward), then reads them back for the mean and again for
the backward. The fused version reads ``pred`` and the target rows once and writes the gradient once
(``[T, D]`` in pred's dtype, the same size autograd's gradient would have); no gathered or normalised
target is ever materialised.

Reference: :func:`masked_l2_loss_reference` (gather, ``.float()``, ``F.layer_norm``, ``((p - t)**2).mean()``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Tiles, triton_available, use_triton

__all__ = ["masked_l2_loss", "masked_l2_loss_reference", "MaskedL2LossFunction"]


def masked_l2_loss_reference(pred: Tensor, target: Tensor, flat_idx: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch. ``pred [T, D]``, ``target [B, N, D]`` (detached), ``flat_idx [T]`` -> fp32 scalar."""
    B, N, D = target.shape
    t = target.detach().reshape(B * N, D)[flat_idx].float()
    t = F.layer_norm(t, (D,), eps=eps)
    return ((pred.float() - t) ** 2).mean()


# ----------------------------------------------------------------------------------------------------
# Triton kernel (forward and gradient in the same pass)
# ----------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_l2_fwd_kernel(
        pred_ptr, tgt_ptr, idx_ptr, grad_ptr, partial_ptr,
        T, D, stride_pred, stride_tgt, stride_grad, eps, grad_scale,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)  # BLOCK_D >= D: whole rows
        row_ok = rows < T
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        # gather + fp32 layer norm of the target rows (biased variance, as F.layer_norm)
        t = tl.load(tgt_ptr + src[:, None] * stride_tgt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(t, axis=1) / D
        tc = tl.where(mask, t - mean[:, None], 0.0)
        var = tl.sum(tc * tc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        tn = tc * rstd[:, None]
        rows64 = rows.to(tl.int64)
        p = tl.load(pred_ptr + rows64[:, None] * stride_pred + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        err = tl.where(mask, p - tn, 0.0)
        tl.store(partial_ptr + pid, tl.sum(tl.sum(err * err, axis=1), axis=0))
        if WRITE_GRAD:
            g = err * grad_scale
            tl.store(grad_ptr + rows64[:, None] * stride_grad + cols[None, :],
                     g.to(grad_ptr.dtype.element_ty), mask=mask)


def _fwd_launch(pred, target2d, flat_idx, grad, partials, eps: float, tiles: Tiles):
    """Arguments and meta-parameters of one ``_masked_l2_fwd_kernel`` launch (real tensors, or
    ``kernels.aot`` stand-ins when compiling ahead of time). ``grad`` None: loss only."""
    T, D = pred.shape
    write_grad = grad is not None
    args = (pred, target2d, flat_idx, grad if write_grad else pred, partials,
            T, D, pred.stride()[0], target2d.stride()[0], grad.stride()[0] if write_grad else 0,
            float(eps), 2.0 / max(1, T * D))
    return args, dict(BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, WRITE_GRAD=write_grad,
                      num_warps=tiles.num_warps)


def _masked_l2_fwd(pred: Tensor, target2d: Tensor, flat_idx: Tensor, eps: float, write_grad: bool):
    T, D = pred.shape
    tiles = dispatch.tiles("masked_l2_loss", D, pred.is_cuda)
    n_prog = triton.cdiv(T, tiles.block_t) if T > 0 else 0
    partials = torch.empty(n_prog, dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred) if write_grad else None
    if n_prog > 0:
        args, meta = _fwd_launch(pred, target2d, flat_idx, grad, partials, eps, tiles)
        _masked_l2_fwd_kernel[(n_prog,)](*args, **meta)
    loss = partials.sum() / (T * D) if T > 0 else torch.full((), float("nan"), device=pred.device)
    return loss, grad


def aot_launches(shapes) -> list:
    """The launches a training step makes at ``shapes`` (a :class:`kernels.specs.Shapes`), one per
    activation dtype and with / without the gradient, for :mod:`kernels.aot`."""
    from kernels import specs

    T, D, rows = shapes.target_tokens, shapes.enc_width, shapes.batch * shapes.patches
    tiles = dispatch.TILE_POLICIES["masked_l2_loss"]["cuda"].tiles(D)
    out = []
    for dt in specs.ACTIVATION_DTYPES:
        for write_grad in (True, False):
            grad = specs.mock(dt, T, D) if write_grad else None
            args, meta = _fwd_launch(specs.mock(dt, T, D), specs.mock(dt, rows, D), specs.mock(torch.int64, T), grad,
                                     specs.mock(torch.float32, T), 1e-6, tiles)
            out.append(specs.Launch(_masked_l2_fwd_kernel, args, meta, dtype=specs.dtype_name(dt), tiles=tiles,
                                  variant="loss+grad" if write_grad else "loss"))
    return out


def check_cases(shapes, dtype: torch.dtype, device) -> list:
    """The masked loss at ``shapes`` (:class:`kernels.specs.Shapes`) in ``dtype``: loss and its gradient,
    for ``make gpu-check`` (:class:`kernels.specs.CheckCase`)."""
    from kernels import specs

    gen = torch.Generator().manual_seed(1)
    B, N, D = shapes.batch, shapes.patches, shapes.enc_width
    flat_idx, _, _ = specs.packed_indices(B, N, shapes.target_tokens, gen, device)
    T = flat_idx.numel()
    pred = specs.randn(gen, T, D, dtype=dtype, device=device, grad=True)
    target = specs.randn(gen, B, N, D, dtype=dtype, device=device, scale=2.0)
    return [specs.CheckCase("masked_l2_loss", "targets", f"pred[{T},{D}] target[{B},{N},{D}]",
                            lambda: masked_l2_loss(pred, target, flat_idx), [pred],
                            bytes_args=dict(B=B, N=N, D=D, T=T, act=pred.element_size()))]


class MaskedL2LossFunction(torch.autograd.Function):
    """Fused gather + layer norm + squared error + mean; the gradient is written in the forward pass."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, flat_idx: Tensor, eps: float) -> Tensor:
        B, N, D = target.shape
        pred = pred.contiguous()
        target2d = target.reshape(B * N, D).contiguous()
        write_grad = bool(ctx.needs_input_grad[0])
        loss, grad = _masked_l2_fwd(pred, target2d, flat_idx.reshape(-1).contiguous(), eps, write_grad)
        if write_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        # grad_output is a 0-dim fp32 tensor; a 0-dim operand does not promote bf16 grads to fp32
        return grad * grad_output, None, None, None


def masked_l2_loss(pred: Tensor, target: Tensor, flat_idx: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean over all ``T*D`` elements of ``(pred - LN(target.reshape(B*N, D)[flat_idx]))**2`` in fp32.

    ``pred [T, D]`` (any float dtype), ``target [B, N, D]`` (treated as detached), ``flat_idx [T]``
    int64 -> fp32 scalar. Gradient to ``pred`` only. Backend from :mod:`kernels.dispatch`.
    """
    if target.dim() != 3 or pred.dim() != 2 or pred.shape[1] != target.shape[2]:
        raise ValueError(f"masked_l2_loss: expected pred [T, D] and target [B, N, D], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if flat_idx.dim() != 1 or flat_idx.numel() != pred.shape[0]:
        raise ValueError(f"masked_l2_loss: flat_idx must be [T] with T = pred.shape[0] = {pred.shape[0]}, "
                         f"got shape {tuple(flat_idx.shape)}")
    target = target.detach()
    if use_triton(pred, target, flat_idx):
        return MaskedL2LossFunction.apply(pred, target, flat_idx, eps)
    return masked_l2_loss_reference(pred, target, flat_idx, eps)
