"""What the kernels' ahead-of-time compile needs from each op, in a module that imports no op.

Each op module lists the launches a training step makes (``aot_launches(shapes)``) as :class:`Launch`
records built from :func:`mock` tensors at a recipe's :class:`Shapes`; :mod:`kernels.aot` imports the
ops and compiles those records. The ops import this module and never :mod:`kernels.aot`, so there is no
import cycle (``tests/test_import_cycles.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from kernels.dispatch import Tiles

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


@dataclass(frozen=True)
class Shapes:
    """The sizes a recipe runs the kernels at (derived from a recipe's config by the caller)."""

    recipe: str
    batch: int            # images per GPU
    patches: int          # N = grid * grid
    enc_width: int        # encoder width: context gather, loss
    pred_width: int       # predictor width: feature conditioning
    action_dim: int       # A
    target_tokens: int    # T of the loss and of feature conditioning (packed over the batch)
    context_tokens: int   # T of the context gather
    encoder_params: int   # elements of the target encoder's flat buffer
    encoder_tensors: int  # parameter tensors of the encoder


def mock(dtype: torch.dtype, *shape: int):
    """A tensor stand-in for compilation: a dtype, a shape, contiguous strides, a 16-byte-aligned address."""
    from triton.runtime.jit import MockTensor

    return MockTensor(dtype, list(shape) or [1])


@dataclass
class Launch:
    """One kernel specialisation: the JIT function, its arguments (mocks and ints) and meta-parameters."""

    kernel: object
    args: tuple
    meta: dict
    dtype: str
    tiles: Tiles
    variant: str = ""
    recipes: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        """What the compiled code depends on: constexprs, dtypes and the ints' divisibility by 16."""
        def norm(a):
            if hasattr(a, "data_ptr"):
                return ("pointer", str(a.dtype))
            if isinstance(a, bool):
                return a
            if isinstance(a, int):
                return ("int", a == 1, a % 16 == 0, a >= 2 ** 31)
            return type(a).__name__
        return (self.name, tuple(norm(a) for a in self.args), tuple(sorted((k, str(v)) for k, v in self.meta.items())))


# ----------------------------------------------------------------------------------------------------
# Checks against the reference (``make gpu-check``): each op module's ``check_cases``
# ----------------------------------------------------------------------------------------------------
@dataclass
class CheckCase:
    """One op at one recipe's shapes, for a check of its Triton kernels against its reference.

    ``forward()`` computes the op through its public function, so the backend follows
    :mod:`kernels.dispatch` (the checker runs it under 'triton' and under 'reference' on the same inputs);
    the gradients of ``leaves`` under a fixed random cotangent are compared too. ``timed`` (optional)
    replaces forward + backward for the timing (an in-place op whose ``forward`` must first copy its
    state). ``bytes_args``: the keyword arguments of the analytic bytes model (``benchmarks/kernels_table.py``'s
    ``bytes_moved(op, ...)``) for the GB/s of a memory-bound op; None for a compute-bound one.
    """

    op: str
    variant: str
    shape: str
    forward: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor] = field(default_factory=list)
    timed: Optional[Callable[[], object]] = None
    bytes_args: Optional[Dict[str, int]] = None


def packed_indices(batch: int, patches: int, total: int, generator: torch.Generator, device) -> tuple:
    """Ragged per-sample index sets packed like the engine's masks: ``total`` tokens over ``batch``
    samples (counts differ by at most one, each at most ``patches``), distinct positions per sample.
    Returns (flat_idx = b * patches + position, position, sample), each int64 [total]."""
    total = min(int(total), batch * patches)
    counts = [total // batch + (b < total % batch) for b in range(batch)]
    pos = torch.cat([torch.randperm(patches, generator=generator)[:k] for k in counts])
    sample = torch.cat([torch.full((k,), b, dtype=torch.long) for b, k in enumerate(counts)])
    return (sample * patches + pos).to(device), pos.to(device), sample.to(device)


def randn(generator: torch.Generator, *shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0,
          grad: bool = False) -> torch.Tensor:
    """Seeded normal values made on the CPU (the same on every device), then moved and cast."""
    t = (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)
