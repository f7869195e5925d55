"""Compile every Triton kernel for sm_80 and sm_90 without a GPU: registers, spills, shared memory.

    python -m benchmarks.compile_table [--arch 80 --arch 90] [--out benchmarks/results/kernels_resources.json]
                                      [--check] [--jobs 2]

Each kernel is compiled (``kernels/aot.py``: a stand-in CUDA driver reporting the architecture, then
Triton's whole pipeline down to ``ptxas``) at the launches a training step makes for the two pretraining
recipes (shapes from ``recipes/pretrain_vitb_equi.py`` and ``recipes/pretrain_vith.py``, see
``benchmarks/kernels_table.py``), with the CUDA tiles of ``kernels.dispatch.TILE_POLICIES``, in bf16,
fp16 and fp32 where the op takes them. Launches that compile to the same code for both recipes are
compiled once (the ``recipes`` column). ``--check`` exits 1 on a spill; a compile error always fails.
``--policy OP=ELEMENTS,MAX_ROWS[,COL/COL/...]`` replaces an op's CUDA tile policy for this run (to see
what another tile costs in registers), ``--maxnreg N`` caps the registers (to see where spills start).

Compiled kernels are cached by Triton under ``.cache/triton-aot`` (``TRITON_CACHE_DIR`` overrides);
the table is the same from an empty cache. ``TRITON_INTERPRET`` is switched off for this process.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions, not the interpreter

import argparse  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from benchmarks.common import ROOT, save_json  # noqa: E402

os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, ".cache", "triton-aot"))

from benchmarks import kernels_table as kt  # noqa: E402
from kernels import aot  # noqa: E402

COLUMNS = [("kernel", "kernel", 22), ("variant", "variant", 12), ("arch", "arch", 5), ("dtype", "dtype", 5),
           ("tiles", "tiles", 8), ("num_warps", "warps", 5), ("registers", "regs", 4), ("spills", "spills", 6),
           ("shared_bytes", "smem B", 6), ("recipes", "recipes", 17)]


def recipe_aot_shapes(name: str) -> aot.Shapes:
    """The recipe's sizes as ``kernels.aot.Shapes`` (from its config, via benchmarks/kernels_table.py)."""
    r = kt.RECIPES[name]
    n_tgt, n_ctx = kt.recipe_counts(name, r["batch"])
    params = kt.encoder_param_shapes(name)
    return aot.Shapes(recipe=name, batch=r["batch"], patches=r["patches"], enc_width=r["enc_width"],
                      pred_width=r["pred_width"], action_dim=r["action_dim"], target_tokens=sum(n_tgt),
                      context_tokens=sum(n_ctx), encoder_params=sum(math.prod(s) for s in params),
                      encoder_tensors=len(params))


def _compile_arch(arch: int, only=None, maxnreg=None):
    shapes = [recipe_aot_shapes(name) for name in kt.RECIPES]
    return aot.compile_all(shapes, archs=[arch], only=only, maxnreg=maxnreg)


def compile_rows(archs, jobs: int = 1, only=None, maxnreg=None):
    """Rows of the resource table: each architecture compiles in a process of its own (the stand-in
    driver stays installed there), ``jobs`` of them at a time."""
    with multiprocessing.get_context("fork").Pool(max(1, min(jobs, len(archs))), maxtasksperchild=1) as pool:
        parts = pool.starmap(_compile_arch, [(a, only, maxnreg) for a in archs])
    return [row for part in parts for row in part]


def set_cuda_policy(spec: str) -> None:
    """``OP=ELEMENTS,MAX_ROWS[,COL/COL/...]`` -> ``TILE_POLICIES[OP]['cuda']`` for this process."""
    from kernels import dispatch

    op, _, value = spec.partition("=")
    parts = value.split(",")
    if op not in dispatch.TILE_POLICIES or len(parts) not in (2, 3):
        raise SystemExit(f"--policy {spec!r}: use OP=ELEMENTS,MAX_ROWS[,COL/COL/...] with OP one of "
                         f"{', '.join(dispatch.TILE_POLICIES)}")
    columns = tuple(int(c) for c in parts[2].split("/")) if len(parts) == 3 else None
    dispatch.TILE_POLICIES[op]["cuda"] = dispatch.TilePolicy(int(parts[0]), int(parts[1]), columns)


def print_table(rows) -> None:
    print("  ".join(f"{title:>{w}s}" if key in ("num_warps", "registers", "spills", "shared_bytes")
                    else f"{title:{w}s}" for key, title, w in COLUMNS))
    for row in rows:
        cells = []
        for key, _, w in COLUMNS:
            v = row[key]
            v = ",".join(v) if isinstance(v, list) else v
            cells.append(f"{v:>{w}}" if isinstance(v, int) else f"{str(v):{w}s}")
        print("  ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 if any kernel spills registers")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (one per arch)")
    ap.add_argument("--only", default=None, help="compile only kernels whose name contains this")
    ap.add_argument("--policy", action="append", default=[], metavar="OP=ELEMENTS,MAX_ROWS[,COL/COL/...]",
                    help="replace an op's CUDA tile policy (kernels.dispatch.TILE_POLICIES) for this run")
    ap.add_argument("--maxnreg", type=int, default=None, help="cap registers per thread")
    args = ap.parse_args(argv)
    for spec in args.policy:
        set_cuda_policy(spec)
    archs = args.arch or list(aot.ARCHS)
    t0 = time.perf_counter()
    try:
        rows = compile_rows(archs, args.jobs, args.only, args.maxnreg)
    except RuntimeError as e:  # kernels.aot names the specialisation that failed
        print(f"COMPILE ERROR: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print_table(rows)
    spilled = [r for r in rows if r["spill_bytes"]]
    print(f"\n{len(rows)} kernel specialisations compiled for {', '.join(f'sm_{a}' for a in archs)} in "
          f"{seconds:.1f} s; {len(spilled)} spill" + ("" if len(spilled) == 1 else "s"))
    import torch
    import triton
    save_json(dict(triton=triton.__version__, torch=torch.__version__, archs=[f"sm_{a}" for a in archs],
                      shapes={name: vars(recipe_aot_shapes(name)) for name in kt.RECIPES},
                      seconds=seconds, rows=rows), args.out)
    if args.check and spilled:
        for r in spilled:
            print(f"SPILL: {r['kernel']} ({r['variant']}) {r['arch']} {r['dtype']} tiles {r['tiles']}: "
                  f"{r['spill_bytes']} bytes of local memory per thread", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
