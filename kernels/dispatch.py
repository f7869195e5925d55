"""The kernel backend choice, in one place.

Every fused op in ``kernels/`` asks :func:`use_triton` whether to run its Triton kernel or its plain
PyTorch reference. The choice is one setting, like timm's ``TIMM_FUSED_ATTN``:

* ``set_backend(name)`` (an in-process override, e.g. from ``TrainConfig.kernels``), else
* the environment variable ``IWM_KERNELS``, else ``"auto"``.

Values:

``auto``       Triton when every tensor is on CUDA and ``triton`` imports; the reference otherwise
               (so CPU runs, the tiny demo and the fast test tier use plain PyTorch).
``triton``     always Triton. CUDA tensors need nothing more; CPU tensors only work under Triton's
               interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported), which is
               how ``tests/kernels`` checks the kernels on a machine without a GPU.
``reference``  always the plain PyTorch reference (debugging, bisecting a numerical difference).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

ENV_VAR = "IWM_KERNELS"
BACKENDS = ("auto", "triton", "reference")

_override: Optional[str] = None


def _check(name: str, source: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(
            f"{source}={name!r} is not a kernel backend: use one of {', '.join(BACKENDS)} "
            f"(set it with the environment variable {ENV_VAR} or kernels.dispatch.set_backend)"
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


class backend:
    """Context manager: ``with backend('reference'): ...`` sets the override and restores it."""

    def __init__(self, name: Optional[str]):
        self.name = name

    def __enter__(self):
        global _override
        self._saved = _override
        set_backend(self.name)
        return self

    def __exit__(self, *exc):
        global _override
        _override = self._saved
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
