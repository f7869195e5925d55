"""What the kernels' ahead-of-time compile needs from each op, in a module that imports no op.

Each op module lists the launches a training step makes (``aot_launches(shapes)``) as :class:`Launch`
records built from :func:`mock` tensors at a recipe's :class:`Shapes`; :mod:`kernels.aot` imports the
ops and compiles those records. The ops import this module and never :mod:`kernels.aot`, so there is no
import cycle (``tests/test_import_cycles.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

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
