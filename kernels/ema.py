"""Target-encoder EMA update: ``target <- momentum * target + (1 - momentum) * online``, in place.

Arithmetic in fp32: target tensors are fp32; online tensors may be fp32 or bf16 (read and upcast).

Paths (chosen by :func:`ema_update_` through :mod:`kernels.dispatch`):

* reference: :func:`ema_update_reference`, a plain per-parameter loop (what I-JEPA does; one or two
  kernel launches per parameter on CUDA).
* foreach (``auto`` on CPU, and ``auto`` on CUDA when the targets are not one flat buffer):
  ``torch._foreach_lerp_`` (multi-tensor apply: a handful of launches, one read-modify-write of the
  target and one read of the online params). bf16 online params are upcast first (one extra copy).
* Triton, flat: when the target tensors are views tiling ONE contiguous fp32 buffer, in any list order
  (see :class:`FlatBuffer`, which re-homes the target encoder's parameters that way), the whole update is
  ONE kernel launch over that buffer: :func:`ema_update_flat_`. The online side may be a flat tensor
  (one more contiguous buffer, any float dtype) or a list of tensors: the list is passed as a device
  table of pointers (multi-tensor apply, one launch per online dtype), so no staging copy is made.
  Bytes moved: 4 (read target) + 4 (write target) + 2 or 4 (read online) per parameter, the minimum.
* Triton, not flat (``IWM_KERNELS=triton`` with ordinary parameters): one launch per tensor pair.

Reference: :func:`ema_update_reference`.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from kernels.dispatch import triton_available, use_triton

__all__ = ["ema_update_", "ema_update_flat_", "ema_update_reference", "ema_update_foreach_", "FlatBuffer",
           "as_flat_view"]


@torch.no_grad()
def ema_update_reference(target: Sequence[Tensor], online: Sequence[Tensor], momentum: float) -> None:
    """Plain loop: ``t.mul_(m).add_(o.float(), alpha=1 - m)`` for each parameter pair."""
    for t, o in zip(target, online):
        t.mul_(momentum).add_(o.float(), alpha=1.0 - momentum)


@torch.no_grad()
def ema_update_foreach_(target: Sequence[Tensor], online: Sequence[Tensor], momentum: float) -> None:
    """Multi-tensor: ``torch._foreach_lerp_(target, online, 1 - momentum)`` (bf16 online upcast first)."""
    target = list(target)
    online = [o if o.dtype == t.dtype else o.to(t.dtype) for t, o in zip(target, online)]
    if target:
        torch._foreach_lerp_(target, online, 1.0 - momentum)


# ----------------------------------------------------------------------------------------------------
# Flat buffer: the target encoder's fp32 parameters as views into one contiguous buffer
# ----------------------------------------------------------------------------------------------------
class FlatBuffer:
    """Re-homes a list of parameters as consecutive views into one contiguous buffer.

    ``fb = FlatBuffer(list(target_encoder.parameters()))`` copies each parameter into ``fb.flat`` (one
    1-D tensor of ``fb.numel`` elements, fp32 by default) and points ``p.data`` at its slice, so the
    module keeps working unchanged while ``ema_update_(params, ...)`` (or
    ``ema_update_flat_(fb.flat, ...)``) runs as one kernel launch. No padding between parameters.
    Re-home BEFORE anything captures the old storages (optimizer, DeepSpeed engine, CUDA graphs);
    ``load_state_dict`` copies into the views in place and keeps them.
    """

    def __init__(self, params: Iterable[Tensor], dtype: torch.dtype = torch.float32):
        seen, self.params = set(), []
        for p in params:  # de-duplicate tied parameters, keep order
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("FlatBuffer: no parameters given")
        device = self.params[0].device
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.numels)
        self.flat = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for p, off, n in zip(self.params, self.offsets, self.numels):
                if p.device != device:
                    raise ValueError(f"FlatBuffer: parameters on {device} and {p.device}")
                view = self.flat[off:off + n].view(p.shape)
                view.copy_(p.data)
                p.data = view

    @classmethod
    def from_module(cls, module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> "FlatBuffer":
        return cls(module.parameters(), dtype=dtype)

    def views(self) -> List[Tensor]:
        return [p.data for p in self.params]

    def is_intact(self) -> bool:
        """False if something re-pointed a parameter away from the buffer (e.g. ``p.data = ...``)."""
        base = self.flat.data_ptr()
        es = self.flat.element_size()
        return all(p.data_ptr() == base + off * es and p.is_contiguous()
                   for p, off in zip(self.params, self.offsets))


def as_flat_view(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """If ``tensors`` are contiguous and tile, in order and without gaps, one range of one storage
    (e.g. :class:`FlatBuffer` views), return a 1-D tensor over that range; else None."""
    tensors = list(tensors)
    if not tensors:
        return None
    t0 = tensors[0]
    storage_ptr = t0.untyped_storage().data_ptr()
    es = t0.element_size()
    expect = t0.data_ptr()
    for t in tensors:
        if (t.dtype != t0.dtype or t.device != t0.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage_ptr or t.data_ptr() != expect):
            return None
        expect += t.numel() * es
    total = (expect - t0.data_ptr()) // es
    flat = torch.empty(0, dtype=t0.dtype, device=t0.device)
    flat.set_(t0.untyped_storage(), t0.storage_offset(), (total,), (1,))
    return flat


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ema_flat_kernel(t_ptr, o_ptr, n, momentum, BLOCK: tl.constexpr):
        # both sides flat: t[i] = m * t[i] + (1 - m) * float(o[i])
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask)
        o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, momentum * t + (1.0 - momentum) * o, mask=mask)

    @triton.jit
    def _ema_table_kernel(t_ptr, o_table_ptr, blk_tensor_ptr, blk_start_ptr, t_off_ptr, numel_ptr,
                          momentum, O_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        # flat target, online given as a table of pointers: program p handles BLOCK elements of
        # online tensor blk_tensor[p], starting at element blk_start[p] of that tensor.
        pid = tl.program_id(0)
        i = tl.load(blk_tensor_ptr + pid)
        start = tl.load(blk_start_ptr + pid).to(tl.int64)
        n = tl.load(numel_ptr + i)
        t_off = tl.load(t_off_ptr + i)
        o_ptr = tl.load(o_table_ptr + i).to(tl.pointer_type(O_DTYPE))
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + t_off + offs, mask=mask)
        o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + t_off + offs, momentum * t + (1.0 - momentum) * o, mask=mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _block(on_cuda: bool) -> int:
    return 4096 if on_cuda else 1 << 16  # interpreter: few programs


def _launch_flat(t_flat: Tensor, o_flat: Tensor, momentum: float) -> None:
    n = t_flat.numel()
    if n:
        blk = _block(t_flat.is_cuda)
        _ema_flat_kernel[(triton.cdiv(n, blk),)](t_flat, o_flat, n, float(momentum), BLOCK=blk)


class _PointerTable:
    """Device tables for the multi-tensor launch, cached on the online tensors' data pointers."""

    _cache: dict = {}

    @classmethod
    def get(cls, online: Sequence[Tensor], t_offsets: Sequence[int], blk: int):
        key = (tuple((o.data_ptr(), o.numel(), o.dtype, o.device) for o in online), tuple(t_offsets), blk)
        hit = cls._cache.get(key)
        if hit is None:
            device = online[0].device
            blk_tensor, blk_start = [], []
            for i, o in enumerate(online):
                for s in range(0, o.numel(), blk):
                    blk_tensor.append(i)
                    blk_start.append(s)
            as_dev = lambda xs, dt: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
            hit = (as_dev([o.data_ptr() for o in online], torch.int64), as_dev(blk_tensor, torch.int32),
                   as_dev(blk_start, torch.int64), as_dev(list(t_offsets), torch.int64),
                   as_dev([o.numel() for o in online], torch.int64))
            if len(cls._cache) > 16:
                cls._cache.clear()
            cls._cache[key] = hit
        return hit


def _launch_table(t_flat: Tensor, online: Sequence[Tensor], momentum: float) -> None:
    # group by online dtype (one launch per dtype; normally exactly one)
    t_offsets, off = [], 0
    for o in online:
        t_offsets.append(off)
        off += o.numel()
    blk = _block(t_flat.is_cuda)
    by_dtype: dict = {}
    for o, toff in zip(online, t_offsets):
        if o.numel():
            by_dtype.setdefault(o.dtype, []).append((o.contiguous(), toff))
    for dtype, pairs in by_dtype.items():
        os_, toffs = [p[0] for p in pairs], [p[1] for p in pairs]
        table, blk_tensor, blk_start, t_off, numel = _PointerTable.get(os_, toffs, blk)
        _ema_table_kernel[(blk_tensor.numel(),)](t_flat, table, blk_tensor, blk_start, t_off, numel,
                                                 float(momentum), O_DTYPE=_TL_DTYPES[dtype], BLOCK=blk)


def _check_pairs(target: Sequence[Tensor], online: Sequence[Tensor]) -> None:
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target tensors but {len(online)} online tensors")
    for i, (t, o) in enumerate(zip(target, online)):
        if t.shape != o.shape:
            raise ValueError(f"ema_update_: tensor {i}: target {tuple(t.shape)} vs online {tuple(o.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"ema_update_: target tensor {i} is {t.dtype}; the EMA keeps fp32 targets")


@torch.no_grad()
def ema_update_flat_(target_flat: Tensor, online: Union[Tensor, Sequence[Tensor]], momentum: float) -> None:
    """One-launch EMA over a flat fp32 buffer (e.g. ``FlatBuffer.flat``), in place.

    ``online`` is either a 1-D tensor with ``target_flat.numel()`` elements (fp32/bf16/fp16) or a list
    of tensors whose numels sum to it, in the same order as the buffer's views. Triton when the
    dispatch allows it (one launch per online dtype), else ``torch.lerp_`` on the flat buffer.
    """
    if target_flat.dim() != 1 or not target_flat.is_contiguous() or target_flat.dtype != torch.float32:
        raise ValueError("ema_update_flat_: target_flat must be a contiguous 1-D fp32 tensor")
    flat_online = isinstance(online, Tensor)
    online_list = [online] if flat_online else list(online)
    total = sum(o.numel() for o in online_list)
    if total != target_flat.numel():
        raise ValueError(f"ema_update_flat_: online has {total} elements, target_flat {target_flat.numel()}")
    if use_triton(target_flat, *online_list):
        if flat_online:
            _launch_flat(target_flat, online.reshape(-1).contiguous(), momentum)
        else:
            _launch_table(target_flat, online_list, momentum)
        return
    o_flat = online.reshape(-1) if flat_online else torch.cat([o.reshape(-1) for o in online_list])
    target_flat.lerp_(o_flat.to(torch.float32), 1.0 - momentum)


@torch.no_grad()
def ema_update_(target: List[Tensor], online: List[Tensor], momentum: float) -> None:
    """``target[i] <- momentum * target[i] + (1 - momentum) * online[i]`` in place, fp32 arithmetic.

    ``target``: fp32 tensors (parameters of the target encoder); ``online``: same shapes, fp32 or bf16.
    Backends (see module docstring): 'reference' -> plain loop; Triton -> one launch when the targets
    are views tiling one flat buffer (:class:`FlatBuffer`; any order of the list, the pairs are
    sorted by address), else (forced 'triton' only) one launch per tensor; otherwise
    ``torch._foreach_lerp_`` (also 'auto' on CUDA with non-flat targets).
    """
    target, online = list(target), list(online)
    _check_pairs(target, online)
    if not target:
        return
    from kernels.dispatch import get_backend
    if use_triton(*target, *online):
        # the caller's order need not be the buffer's (engine/ema.py sorts by name): order the pairs
        # by the target's address, then test whether they tile one flat buffer
        order = sorted(range(len(target)), key=lambda i: target[i].data_ptr())
        t_sorted = [target[i] for i in order]
        t_flat = as_flat_view(t_sorted)
        if t_flat is not None:
            o_sorted = [online[i] for i in order]
            o_flat = as_flat_view(o_sorted)
            ema_update_flat_(t_flat, o_flat if o_flat is not None else o_sorted, momentum)
            return
        if get_backend() == "triton":  # forced, not flat: one launch per tensor pair
            for t, o in zip(target, online):
                if not t.is_contiguous():
                    raise ValueError("ema_update_ (triton): non-contiguous target tensor")
                _launch_flat(t.view(-1), o.reshape(-1).contiguous(), momentum)
            return
        # auto on CUDA, not flat: the multi-tensor foreach path beats one launch per parameter
    if get_backend() == "reference":
        ema_update_reference(target, online, momentum)
    else:
        ema_update_foreach_(target, online, momentum)
