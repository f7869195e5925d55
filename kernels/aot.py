"""Compile every Triton kernel of ``kernels/`` for a CUDA architecture without a GPU, and read back
each kernel's registers, spills and shared memory.

Triton compiles for the target its active driver reports. :class:`TargetDriver` stands in for the CUDA
driver and reports ``GPUTarget("cuda", arch, 32)``; ``kernel.warmup(...)`` then runs the whole
pipeline (Triton IR, LLVM, PTX, and ``ptxas`` from the Triton wheel) without launching anything, and
``cuobjdump --dump-resource-usage`` (also in the wheel) reads the cubin. A spill shows as local memory
(``LOCAL`` / ``STACK`` bytes per thread: the kernels here use no local arrays, so any is a spill).

Each op module lists the launches a training step makes, through the same argument builders its
launcher uses, at the CUDA tiles of :data:`kernels.dispatch.TILE_POLICIES`: ``aot_launches(shapes)``,
with :func:`mock` tensors standing in for the real ones (a dtype and a shape: all the compiler sees).

This must run where ``TRITON_INTERPRET`` is off (with it on, ``@triton.jit`` builds interpreter
functions): ``benchmarks/compile_table.py`` runs it (``python -m benchmarks.compile_table``), and
``tests/kernels/test_compile.py`` runs that in a subprocess. Nothing here needs CUDA, and nothing here imports
``engine/``.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

from kernels.specs import ACTIVATION_DTYPES, Launch, Shapes, dtype_name, mock  # noqa: F401  (re-exported)

ARCHS = (80, 90)

def op_modules() -> list:
    """The registry of fused ops: the modules of ``kernels/`` that hold Triton kernels, in a fixed order.
    Each provides ``aot_launches(shapes)`` (the sm_80 / sm_90 compile tier) and ``check_cases(shapes,
    dtype, device)`` (``make gpu-check``: the kernels against the reference, :class:`kernels.specs.CheckCase`);
    a new op joins both by being listed here."""
    from kernels import ema, feature_conditioning, gather, l2_loss, layer_norm_linear

    return [gather, l2_loss, feature_conditioning, layer_norm_linear, ema]


def launches(shapes_list: Sequence[Shapes]) -> List[Launch]:
    """Every op's launches at every recipe's shapes, de-duplicated (identical specialisations compile
    to identical code; ``Launch.recipes`` says which recipes need each)."""
    out: Dict[tuple, Launch] = {}
    for shapes in shapes_list:
        for module in op_modules():
            for launch in module.aot_launches(shapes):
                kept = out.setdefault(launch.key(), launch)
                if shapes.recipe not in kept.recipes:
                    kept.recipes.append(shapes.recipe)
    return list(out.values())


class TargetDriver:
    """Stands in for Triton's CUDA driver: reports a compute capability, owns no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", int(arch), 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


_RESOURCE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers per thread, stack and local bytes per thread, static shared bytes (``cuobjdump``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    m = _RESOURCE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage: no function found in:\n{text}")
    return dict(registers=int(m.group(2)), stack_bytes=int(m.group(3)), static_shared_bytes=int(m.group(4)),
                local_bytes=int(m.group(5)))


def use_target(arch: int, kernels: Sequence[object] = ()) -> None:
    """Make Triton compile for ``sm_<arch>`` in this process: install :class:`TargetDriver` (for good:
    nothing can be launched afterwards, so compile in a process of its own) and drop the per-device
    caches of ``kernels`` (JIT functions), which remember the target they were first used with."""
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("kernels.aot needs TRITON_INTERPRET off before triton is imported "
                           "(run python -m benchmarks.compile_table in a fresh process with TRITON_INTERPRET=0)")
    driver.set_active(TargetDriver(arch))
    for kernel in kernels:
        kernel.device_caches.clear()


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for ``sm_<arch>`` (after :func:`use_target`); a row of the resource table.
    Raises on a compile error (``ptxas`` included)."""
    try:
        compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.meta)
    except Exception as e:  # CompilationError, PTXASError, ...: say which specialisation, keep the message
        t = launch.tiles
        raise RuntimeError(f"{launch.name} ({launch.variant or 'default'}, {launch.dtype}, tiles "
                           f"{t.block_t}x{t.block_d}, {launch.meta.get('num_warps', 4)} warps) does not compile "
                           f"for sm_{arch}: {type(e).__name__}: {e}") from None
    usage = resource_usage(compiled.asm["cubin"])
    spill_bytes = usage["stack_bytes"] + usage["local_bytes"]
    t = launch.tiles
    return dict(kernel=launch.name, variant=launch.variant, arch=f"sm_{arch}", dtype=launch.dtype,
                tiles=f"{t.block_t}x{t.block_d}", num_warps=launch.meta.get("num_warps", 4),
                registers=usage["registers"], spills=spill_bytes // 4, spill_bytes=spill_bytes,
                shared_bytes=int(compiled.metadata.shared), static_shared_bytes=usage["static_shared_bytes"],
                recipes=list(launch.recipes))


def compile_all(shapes_list: Sequence[Shapes], archs: Sequence[int] = ARCHS,
                only: Optional[str] = None, maxnreg: Optional[int] = None) -> List[dict]:
    """Compile every launch for every arch; rows in a stable order. ``only``: a kernel-name substring;
    ``maxnreg``: cap the registers per thread (shows where a kernel would start to spill)."""
    todo = [launch for launch in launches(shapes_list) if not only or only in launch.name]
    if maxnreg:
        for launch in todo:
            launch.meta["maxnreg"] = int(maxnreg)
    rows = []
    for arch in archs:
        use_target(arch, {id(launch.kernel): launch.kernel for launch in todo}.values())
        rows += [compile_launch(launch, arch) for launch in todo]
    return rows
