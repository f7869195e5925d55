"""The backend choices, in one place: fused ops (``IWM_KERNELS``) and ragged attention (``IWM_ATTENTION``).

Every fused op in ``kernels/`` asks :func:`use_triton` whether to run its Triton kernel or its plain
PyTorch reference; ``kernels.attention`` asks :func:`get_attention_backend` which attention to run.
Each choice is one setting, like timm's ``TIMM_FUSED_ATTN``, resolved the same way:

* an in-process override: :func:`configure` (the engine calls it with ``train.kernels`` and
  ``train.attention``; ``None`` or ``"auto"`` leaves the choice to the environment), else
* the environment variable (``IWM_KERNELS`` / ``IWM_ATTENTION``), else ``"auto"``.

Fused-op values:

``auto``       Triton when every tensor is on CUDA and ``triton`` imports; the reference otherwise
               (so CPU runs, the tiny demo and the fast test tier use plain PyTorch).
``triton``     always Triton. CUDA tensors need nothing more; CPU tensors only work under Triton's
               interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported), which is
               how ``tests/kernels`` checks the kernels on a machine without a GPU.
``reference``  always the plain PyTorch reference (debugging, bisecting a numerical difference).

Attention values: ``auto`` (xformers on CUDA when its kernels run, else sdpa), ``xformers``, ``sdpa``,
``reference`` (see ``kernels/attention.py``).

Tiles. Every Triton launcher asks :func:`tiles` for its block sizes. The choices live in one table,
:data:`TILE_POLICIES`: per op, one :class:`TilePolicy` for CUDA (column tiles that pad the width least,
a few thousand elements per program) and one for the CPU interpreter (whole rows, up to 16 of them: it
runs one program at a time, so few big programs are fast). The target follows the tensors' device;
``with use_tiles('cuda'):`` forces the CUDA choices on the interpreter (the tests run the column tiling
and the cross-tile atomics that way), and ``benchmarks/compile_table.py`` compiles the CUDA choices for
sm_80 / sm_90 without a GPU (``kernels/aot.py``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

ENV_VAR = "IWM_KERNELS"
BACKENDS = ("auto", "triton", "reference")
ATTENTION_ENV_VAR = "IWM_ATTENTION"
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "reference")

_override: Optional[str] = None
_attention_override: Optional[str] = None


def _check(name: str, source: str, choices=BACKENDS, what: str = "kernel backend", env: str = ENV_VAR) -> str:
    """``name`` lower-cased if it is one of ``choices``, else a ValueError naming the setting and the fix."""
    value = str(name).strip().lower()
    if value not in choices:
        raise ValueError(
            f"{source}={name!r} is not {'an' if what[0] in 'aeiou' else 'a'} {what}: use one of {', '.join(choices)} "
            f"(set it with the environment variable {env} or kernels.dispatch.configure)"
        )
    return value


def set_backend(name: Optional[str]) -> None:
    """Override the backend for this process (``None`` clears the override and falls back to
    ``IWM_KERNELS``). Raises ValueError for a name other than auto, triton, reference."""
    global _override
    _override = None if name is None else _check(name, "set_backend")


def get_backend() -> str:
    """The backend in force: the :func:`set_backend` override, else ``$IWM_KERNELS``, else 'auto'."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def _check_attention(name: str, source: str) -> str:
    return _check(name, source, ATTENTION_BACKENDS, "attention backend", ATTENTION_ENV_VAR)


def set_attention_backend(name: Optional[str]) -> None:
    """Override the attention backend for this process (``None`` falls back to ``IWM_ATTENTION``)."""
    global _attention_override
    _attention_override = None if name is None else _check_attention(name, "set_attention_backend")


def get_attention_backend() -> str:
    """The attention backend asked for (before 'auto' is resolved against the device)."""
    if _attention_override is not None:
        return _attention_override
    return _check_attention(os.environ.get(ATTENTION_ENV_VAR, "auto"), ATTENTION_ENV_VAR)


def configure(kernels: Optional[str] = None, attention: Optional[str] = None) -> None:
    """The engine's one call: set both overrides from the config (``None`` / ``'auto'``: use the environment)."""
    set_backend(None if kernels in (None, "auto") else kernels)
    set_attention_backend(None if attention in (None, "auto") else attention)


class backend:
    """Context manager: ``with backend('reference', attention='sdpa'): ...`` sets the overrides given
    (``None`` leaves that one as it is) and restores both on exit."""

    def __init__(self, name: Optional[str] = None, attention: Optional[str] = None):
        self.name, self.attention = name, attention

    def __enter__(self):
        self._saved = (_override, _attention_override)
        if self.name is not None:
            set_backend(self.name)
        if self.attention is not None:
            set_attention_backend(self.attention)
        return self

    def __exit__(self, *exc):
        global _override, _attention_override
        _override, _attention_override = self._saved
        return False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True if ``import triton`` works (the CPU-only wheels of torch ship without it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


def interpreter_enabled() -> bool:
    """True if Triton's interpreter is on (kernels then run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: Optional[torch.Tensor]) -> bool:
    """Should an op whose inputs are ``tensors`` run its Triton kernel? (``None`` entries are ignored.)

    Raises RuntimeError when the backend is 'triton' but Triton cannot run on these tensors.
    """
    name = get_backend()
    if name == "reference":
        return False
    ts = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in ts)
    if name == "auto":
        return bool(ts) and on_cuda and triton_available()
    # name == "triton": forced
    if not triton_available():
        raise RuntimeError(
            f"{ENV_VAR}=triton (or set_backend('triton')) but triton cannot be imported; install the "
            f"CUDA build of torch (it ships triton) or use {ENV_VAR}=auto / reference"
        )
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in ts if not t.is_cuda})
        raise RuntimeError(
            f"{ENV_VAR}=triton but the tensors are on {', '.join(devices)}: Triton kernels run on CPU "
            f"tensors only under the interpreter. Set TRITON_INTERPRET=1 before triton is first imported "
            f"(tests/conftest.py does this), move the tensors to CUDA, or use {ENV_VAR}=auto / reference"
        )
    return True


# ----------------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------------
def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def column_block(n: int, choices=(1024, 512, 256, 128)) -> int:
    """The column tile (from ``choices``, powers of two) that pads ``n`` least; ties go to the larger
    tile. E.g. 384 -> 128 (3 tiles, no padding), 768 -> 256, 1280 -> 256, 512 -> 512, 1023 -> 1024."""
    best = None
    for b in sorted(choices, reverse=True):
        padded = -(-int(n) // b) * b
        if best is None or padded < best[0]:
            best = (padded, b)
    return best[1]


TILE_TARGETS = ("cuda", "interpreter")


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one launch: ``block_t`` rows x ``block_d`` columns per program, ``num_warps``."""

    block_t: int
    block_d: int
    num_warps: int


@dataclass(frozen=True)
class TilePolicy:
    """How an op cuts a ``[rows, D]`` problem into programs on one target.

    ``columns``: the column tile choices (powers of two; :func:`column_block` picks the one that pads
    ``D`` least), or None for whole rows (``block_d = next_power_of_2(D)``: the op needs a whole row in
    registers, e.g. for a layer norm). ``block_t`` is ``elements // block_d`` capped at ``max_rows``,
    and at least ``min_rows`` (``tl.dot`` takes blocks of 16 and more).
    Warps: one per 1024 elements of the tile, between 4 and 8.
    """

    elements: int
    max_rows: int
    columns: Optional[Tuple[int, ...]] = None
    min_rows: int = 1

    def tiles(self, D: int) -> Tiles:
        whole = next_power_of_2(D)
        block_d = whole if self.columns is None else min(whole, column_block(D, self.columns))
        block_t = max(self.min_rows, min(self.max_rows, self.elements // block_d))
        return Tiles(block_t, block_d, min(8, max(4, block_t * block_d // 1024)))


_INTERPRETER_ROWS = TilePolicy(elements=32768, max_rows=16)  # whole rows, few programs
_INTERPRETER_DOT = TilePolicy(elements=1 << 16, max_rows=64, min_rows=16)  # whole rows, tl.dot-sized

#: op -> target -> policy. The EMA is a ``[1, n]`` problem (one flat buffer): only its column tile matters.
TILE_POLICIES: Dict[str, Dict[str, TilePolicy]] = {
    "masked_l2_loss": {"cuda": TilePolicy(elements=8192, max_rows=64), "interpreter": _INTERPRETER_ROWS},
    "gather_tokens": {"cuda": TilePolicy(elements=4096, max_rows=64, columns=(1024, 512, 256, 128)),
                      "interpreter": _INTERPRETER_ROWS},
    # 2048 elements: with the 12-column action the backward spilled at 4096 (sm_80 fp32, sm_90 fp32)
    "feature_conditioning": {"cuda": TilePolicy(elements=2048, max_rows=64, columns=(512, 256, 128)),
                             "interpreter": _INTERPRETER_ROWS},
    # LN -> linear: forward [M, N] tiles of y (the K loop in blocks of layer_norm_linear.reduction_block),
    # weight gradient [N, K] tiles of g_W (the M loop likewise), LayerNorm backward [M, K] row tiles
    "layer_norm_linear": {"cuda": TilePolicy(elements=8192, max_rows=64, columns=(128, 64), min_rows=16),
                          "interpreter": _INTERPRETER_DOT},
    "layer_norm_linear_dw": {"cuda": TilePolicy(elements=8192, max_rows=64, columns=(128, 64), min_rows=16),
                             "interpreter": _INTERPRETER_DOT},
    "layer_norm_backward": {"cuda": TilePolicy(elements=4096, max_rows=16, columns=(256, 128)),
                            "interpreter": _INTERPRETER_ROWS},
    "ema_update": {"cuda": TilePolicy(elements=4096, max_rows=1, columns=(4096,)),
                   "interpreter": TilePolicy(elements=1 << 16, max_rows=1, columns=(1 << 16,))},
}

_tile_override: Optional[str] = None


def tile_target(on_cuda: bool) -> str:
    """'cuda' or 'interpreter': the :func:`use_tiles` override, else the tensors' device."""
    if _tile_override is not None:
        return _tile_override
    return "cuda" if on_cuda else "interpreter"


def tiles(op: str, D: int, on_cuda: bool) -> Tiles:
    """The tiles ``op`` launches with for width ``D`` (see :data:`TILE_POLICIES`)."""
    if op not in TILE_POLICIES:
        raise KeyError(f"no tile policy for {op!r}: known ops are {', '.join(TILE_POLICIES)}")
    return TILE_POLICIES[op][tile_target(on_cuda)].tiles(D)


class use_tiles:
    """Context manager: ``with use_tiles('cuda'): ...`` makes every launcher take the CUDA tiles (also
    on CPU tensors under the interpreter); ``None`` restores the device-based choice. Restores on exit."""

    def __init__(self, target: Optional[str]):
        if target is not None and target not in TILE_TARGETS:
            raise ValueError(f"use_tiles({target!r}): use one of {', '.join(TILE_TARGETS)} or None")
        self.target = target

    def __enter__(self):
        global _tile_override
        self._saved, _tile_override = _tile_override, self.target
        return self

    def __exit__(self, *exc):
        global _tile_override
        _tile_override = self._saved
        return False
