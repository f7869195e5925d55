"""Target-encoder EMA: ``target <- momentum * target + (1 - momentum) * online``, in place, fp32 math.

docs/method.md ("EMA target encoder"). The target side is ONE contiguous fp32 buffer:
:class:`FlatBuffer` re-homes a list of parameters as consecutive views into it. The online side is
either a list of tensors (numels summing to the buffer, in the buffer's order) or one flat tensor of
the buffer's size (e.g. a ZeRO-3 partition updating the matching shard of the buffer, shard-local);
fp32, bf16 or fp16, read and upcast.

Paths of :func:`ema_update_flat_` (chosen through :mod:`kernels.dispatch`):

* Triton, online flat: one launch over the buffer (``_ema_flat_kernel``).
* Triton, online a list: one launch per online dtype (normally one); the list is passed as a device
  table of pointers (multi-tensor apply, ``_ema_table_kernel``), so no staging copy is made.
  Either way 4 (read target) + 4 (write target) + 2 or 4 (read online) bytes per parameter, the minimum.
* otherwise (CPU, or ``IWM_KERNELS=reference``): :func:`ema_update_reference`, a plain loop over the
  tensors, on views of the buffer.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Union

import torch
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Tiles, triton_available, use_triton

__all__ = ["FlatBuffer", "ema_update_flat_", "ema_update_reference"]

ONLINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def ema_update_reference(target: Sequence[Tensor], online: Sequence[Tensor], momentum: float) -> None:
    """Plain loop: ``t.mul_(m).add_(o.float(), alpha=1 - m)`` for each (target, online) pair."""
    for t, o in zip(target, online):
        t.mul_(momentum).add_(o.float(), alpha=1.0 - momentum)


class FlatBuffer:
    """A list of parameters re-homed as consecutive views into one contiguous fp32 buffer.

    ``fb = FlatBuffer(params)`` copies each parameter into ``fb.flat`` (1-D, ``fb.numel`` elements, no
    padding; tied parameters once, in first-seen order: ``fb.params``) and points ``p.data`` at its
    slice, so the module keeps working unchanged and ``ema_update_flat_(fb.flat, online, m)`` updates
    every parameter. Re-home BEFORE anything captures the old storages (an optimizer, a CUDA graph);
    ``load_state_dict`` copies into the views in place and keeps them. :meth:`is_intact` says whether
    they still are.
    """

    def __init__(self, params: Iterable[Tensor]):
        seen, self.params = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("FlatBuffer: no parameters given")
        device = self.params[0].device
        for p in self.params:
            if p.device != device:
                raise ValueError(f"FlatBuffer: parameters on {device} and {p.device}: move them to one device first")
            if not p.is_floating_point():
                raise ValueError(f"FlatBuffer: a {p.dtype} parameter; only floating-point parameters can be re-homed")
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.numels)
        self.flat = torch.empty(self.numel, dtype=torch.float32, device=device)
        with torch.no_grad():
            for p, off, n in zip(self.params, self.offsets, self.numels):
                view = self.flat[off:off + n].view(p.shape)
                view.copy_(p.data)
                p.data = view

    def views(self) -> List[Tensor]:
        """The parameters' tensors (views into :attr:`flat`), in buffer order."""
        return [p.data for p in self.params]

    def is_intact(self) -> bool:
        """False if something re-pointed a parameter away from the buffer (e.g. ``p.data = ...``)."""
        base, es = self.flat.data_ptr(), self.flat.element_size()
        return all(p.dtype == torch.float32 and p.is_contiguous() and p.data_ptr() == base + off * es
                   for p, off in zip(self.params, self.offsets))


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


def _flat_launch(t_flat, o_flat, momentum: float, tiles: Tiles):
    """Grid, arguments, meta-parameters of ``_ema_flat_kernel`` (real tensors or :mod:`kernels.aot`
    stand-ins)."""
    n = t_flat.shape[0]
    return ((triton.cdiv(n, tiles.block_d),), (t_flat, o_flat, n, float(momentum)),
            dict(BLOCK=tiles.block_d, num_warps=tiles.num_warps))


def _table_launch(t_flat, table, blk_tensor, blk_start, t_off, numel, momentum: float, dtype: torch.dtype,
                  tiles: Tiles):
    """Grid, arguments, meta-parameters of ``_ema_table_kernel``: one program per online block."""
    return ((blk_tensor.shape[0],), (t_flat, table, blk_tensor, blk_start, t_off, numel, float(momentum)),
            dict(O_DTYPE=_TL_DTYPES[dtype], BLOCK=tiles.block_d, num_warps=tiles.num_warps))


class _PointerTable:
    """Device tables for the multi-tensor launch, cached on the online tensors' addresses and sizes
    (a table is a pure function of its key)."""

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


def _launch_flat(t_flat: Tensor, o_flat: Tensor, momentum: float) -> None:
    if t_flat.numel():
        tiles = dispatch.tiles("ema_update", t_flat.numel(), t_flat.is_cuda)
        grid, args, meta = _flat_launch(t_flat, o_flat, momentum, tiles)
        _ema_flat_kernel[grid](*args, **meta)


def _launch_table(t_flat: Tensor, online: Sequence[Tensor], momentum: float) -> None:
    tiles = dispatch.tiles("ema_update", max(o.numel() for o in online), t_flat.is_cuda)
    by_dtype: dict = {}  # one launch per online dtype (normally exactly one)
    off = 0
    for o in online:
        if o.numel():
            by_dtype.setdefault(o.dtype, []).append((o.contiguous(), off))
        off += o.numel()
    for dtype, pairs in by_dtype.items():
        tensors, offsets = [p[0] for p in pairs], [p[1] for p in pairs]
        table = _PointerTable.get(tensors, offsets, tiles.block_d)
        grid, args, meta = _table_launch(t_flat, *table, momentum, dtype, tiles)
        _ema_table_kernel[grid](*args, **meta)


def aot_launches(shapes) -> list:
    """Both launches for an encoder of ``shapes.encoder_params`` parameters (:class:`kernels.specs.Shapes`),
    per online dtype: flat online (a ZeRO-3 partition) and a list of online tensors (pointer table)."""
    from kernels import specs

    n = shapes.encoder_params
    tiles = dispatch.TILE_POLICIES["ema_update"]["cuda"].tiles(n)
    f32, i64 = torch.float32, torch.int64
    out = []
    for dt in ONLINE_DTYPES:
        _, args, meta = _flat_launch(specs.mock(f32, n), specs.mock(dt, n), 0.996, tiles)
        out.append(specs.Launch(_ema_flat_kernel, args, meta, dtype=specs.dtype_name(dt), tiles=tiles,
                              variant="flat online"))
        k, blocks = shapes.encoder_tensors, triton.cdiv(n, tiles.block_d) + shapes.encoder_tensors
        _, args, meta = _table_launch(specs.mock(f32, n), specs.mock(i64, k), specs.mock(torch.int32, blocks),
                                      specs.mock(i64, blocks), specs.mock(i64, k), specs.mock(i64, k), 0.996, dt, tiles)
        out.append(specs.Launch(_ema_table_kernel, args, meta, dtype=specs.dtype_name(dt), tiles=tiles,
                              variant="online list"))
    return out


def check_cases(shapes, dtype: torch.dtype, device) -> list:
    """One EMA update of a ``shapes.encoder_params`` fp32 buffer from online weights in ``dtype``, both
    launches (a flat partition, a list of ``shapes.encoder_tensors`` tensors), for ``make gpu-check``
    (:class:`kernels.specs.CheckCase`): ``forward`` updates a copy, ``timed`` the buffer in place."""
    from kernels import specs

    gen = torch.Generator().manual_seed(3)
    n, k = shapes.encoder_params, max(1, min(shapes.encoder_tensors, shapes.encoder_params))
    start = specs.randn(gen, n, device=device)
    online_flat = specs.randn(gen, n, dtype=dtype, device=device)
    online_list = list(online_flat.split([n // k + (i < n % k) for i in range(k)]))
    scratch = start.clone()
    cases = []
    for variant, online in (("flat online", online_flat), ("online list", online_list)):
        def forward(online=online):
            t = start.clone()
            ema_update_flat_(t, online, 0.996)
            return t

        cases.append(specs.CheckCase("ema_update", variant, f"{n / 1e6:.1f}M params, {k} tensors, online "
                                     f"{specs.dtype_name(dtype)}", forward,
                                     timed=lambda online=online: ema_update_flat_(scratch, online, 0.996),
                                     bytes_args=dict(B=0, N=0, D=0, T=0, params=n, online=online_flat.element_size())))
    return cases


@torch.no_grad()
def ema_update_flat_(target_flat: Tensor, online: Union[Tensor, Sequence[Tensor]], momentum: float) -> None:
    """``target_flat <- momentum * target_flat + (1 - momentum) * online``, in place, fp32 arithmetic.

    ``target_flat``: a contiguous 1-D fp32 tensor (:attr:`FlatBuffer.flat`, or the shard of it that
    matches a ZeRO-3 partition). ``online``: one tensor of ``target_flat.numel()`` elements (flat: a
    ZeRO-3 partition), or a list of tensors whose numels sum to it, in the buffer's order (the online
    encoder's parameters); fp32, bf16 or fp16. Triton when :mod:`kernels.dispatch` allows it, else
    :func:`ema_update_reference` on views of the buffer.
    """
    if (not isinstance(target_flat, Tensor) or target_flat.dim() != 1 or not target_flat.is_contiguous()
            or target_flat.dtype != torch.float32):
        raise ValueError("ema_update_flat_: target_flat must be a contiguous 1-D fp32 tensor "
                         "(FlatBuffer(target_params).flat)")
    flat_online = isinstance(online, Tensor)
    online_list = [online.reshape(-1)] if flat_online else list(online)
    for i, o in enumerate(online_list):
        if o.dtype not in ONLINE_DTYPES:
            raise ValueError(f"ema_update_flat_: online tensor {i} is {o.dtype}; use fp32, bf16 or fp16")
        if o.device != target_flat.device:
            raise ValueError(f"ema_update_flat_: online tensor {i} is on {o.device}, the target buffer on "
                             f"{target_flat.device}: both sides must be on one device")
    total = sum(o.numel() for o in online_list)
    if total != target_flat.numel():
        raise ValueError(f"ema_update_flat_: online has {total} elements but target_flat {target_flat.numel()}: "
                         f"pass the online parameters in the buffer's order (FlatBuffer.params), or the "
                         f"partition that matches this shard")
    if not online_list or total == 0:
        return
    if use_triton(target_flat, *online_list):
        if flat_online:
            _launch_flat(target_flat, online_list[0].contiguous(), momentum)
        else:
            _launch_table(target_flat, online_list, momentum)
        return
    views = [t.view(o.shape) for t, o in zip(target_flat.split([o.numel() for o in online_list]), online_list)]
    ema_update_reference(views, online_list, momentum)
