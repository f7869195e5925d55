"""Attention over ragged, packed batches: one setting picks the backend.

Each sample of a batch has its own number of tokens (context tokens for the encoder; context + target
(+ action) tokens for the predictor). They are packed into one sequence of T tokens with offsets
``cu_seqlens`` [B+1]; a token attends only to tokens of its own sample. No token is dropped.

Backends (chosen in ``kernels/dispatch.py``: ``IWM_ATTENTION`` or ``dispatch.configure(attention=...)``,
which the engine calls with ``train.attention``):

- ``xformers``: ``xformers.ops.memory_efficient_attention`` on the packed sequence with a
  ``BlockDiagonalMask`` built from the per-sample lengths: no padding is computed (CUDA only).
- ``sdpa``: PyTorch ``scaled_dot_product_attention`` on the batch padded to its longest sample with a
  key-padding mask (any device; padding rows cost compute but no token is lost).
- ``reference``: a plain per-sample loop with an explicit softmax; the ground truth for tests.
- ``auto``: xformers when the tensors are on CUDA and its kernels run, else sdpa.

The xformers mask is testable on CPU: ``tests/kernels/attention_helpers.py`` materialises the mask this
module builds (:func:`_block_diagonal_mask`) and compares it with a dense block-diagonal bias
(``benchmarks/common.py``'s ``block_diagonal_bias``).
"""
from __future__ import annotations

import functools
import logging
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from kernels.dispatch import ATTENTION_BACKENDS as BACKENDS
from kernels.dispatch import get_attention_backend

log = logging.getLogger(__name__)
_announced = set()


def xformers_available() -> bool:
    """xformers imports (its attention-bias classes work on any device)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # not installed, or broken
        return False
    return True


@functools.lru_cache(maxsize=None)
def xformers_usable(device_index: int = 0) -> bool:
    """xformers' CUDA kernels actually run here: a wheel built for another torch imports fine but has no
    operators, so try one tiny call once per device and remember the answer."""
    if not (torch.cuda.is_available() and xformers_available()):
        return False
    try:
        q = torch.zeros(1, 2, 1, 8, device=f"cuda:{device_index}", dtype=torch.float16)
        _ragged_attention_xformers(q[0], q[0], q[0], [1, 1])
    except Exception as e:  # NotImplementedError "No operator found ..." and friends
        log.warning("xformers is installed but its kernels do not run (%s): using SDPA", str(e).splitlines()[0])
        return False
    return True


def resolve_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """The backend to run on `device`: `requested` if given, else ``dispatch.get_attention_backend()``."""
    name = requested if requested not in (None, "auto") else get_attention_backend()
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "xformers" if device.type == "cuda" and xformers_usable(device.index or 0) else "sdpa"
    elif name == "xformers" and (device.type != "cuda" or not xformers_usable(device.index or 0)):
        raise RuntimeError("attention backend 'xformers' needs CUDA tensors and a working xformers "
                           "(`pip install -e .[xformers]`, built for this torch); set train.attention=sdpa "
                           "(or auto; env IWM_ATTENTION) to run without it")
    if name not in _announced:
        _announced.add(name)
        log.info("attention backend: %s", name)
    return name


def _token_positions(seqlens: Sequence[int], device) -> tuple:
    """For every packed token: its sample b and its position j within the sample (cached: every layer
    of a forward pass asks for the same lengths)."""
    return _token_positions_cached(tuple(int(n) for n in seqlens), str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=8)
def _token_positions_cached(seqlens: tuple, device: str) -> tuple:
    total = sum(seqlens)
    lens = torch.tensor(seqlens)
    b = torch.repeat_interleave(torch.arange(len(seqlens)), lens, output_size=total)
    j = torch.arange(total) - (torch.cumsum(lens, 0) - lens)[b]
    return b.to(device), j.to(device)


def ragged_attention_reference(q, k, v, seqlens: Sequence[int]) -> torch.Tensor:
    """q, k, v: [T, H, Dh] packed. A loop over samples with an explicit softmax."""
    out = []
    start = 0
    scale = q.shape[-1] ** -0.5
    for n in seqlens:
        qs, ks, vs = (t[start:start + n].transpose(0, 1).float() for t in (q, k, v))  # [H, n, Dh]
        attn = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        out.append((attn @ vs).transpose(0, 1).to(q.dtype))
        start += n
    return torch.cat(out, 0)


def _ragged_attention_sdpa(q, k, v, seqlens: Sequence[int]) -> torch.Tensor:
    T, H, Dh = q.shape
    B, L = len(seqlens), max(seqlens)
    b, j = _token_positions(seqlens, q.device)
    rows = b * L + j  # where each packed token sits in the padded [B*L] layout

    def pad(t):
        return t.new_zeros(B * L, H, Dh).index_copy(0, rows, t).view(B, L, H, Dh).transpose(1, 2)

    keep = torch.zeros(B * L, dtype=torch.bool, device=q.device)
    keep[rows] = True
    key_mask = keep.view(B, 1, 1, L)  # True = attend
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask)  # [B, H, L, Dh]
    return out.transpose(1, 2).reshape(B * L, H, Dh).index_select(0, rows)


def _ragged_attention_xformers(q, k, v, seqlens: Sequence[int]) -> torch.Tensor:
    import xformers.ops as xops

    bias = _block_diagonal_mask(tuple(int(n) for n in seqlens))
    return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


@functools.lru_cache(maxsize=8)
def _block_diagonal_mask(seqlens: tuple):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    return BlockDiagonalMask.from_seqlens(list(seqlens))


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: List[int],
                     backend: Optional[str] = None) -> torch.Tensor:
    """Self-attention of each sample over its own tokens. q, k, v: [T, H, Dh]; seqlens: host ints,
    sum(seqlens) == T. Returns [T, H, Dh]."""
    if sum(seqlens) != q.shape[0]:
        raise ValueError(f"seqlens sum to {sum(seqlens)} but the packed batch has {q.shape[0]} tokens")
    name = resolve_backend(q.device, backend)
    if name == "xformers":
        return _ragged_attention_xformers(q, k, v, seqlens)
    if name == "sdpa":
        return _ragged_attention_sdpa(q, k, v, seqlens)
    if name == "reference":
        return ragged_attention_reference(q, k, v, seqlens)
    raise ValueError(f"attention backend {name!r}: use one of {', '.join(BACKENDS)}")
