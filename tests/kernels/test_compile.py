"""GPU readiness without a GPU: every Triton kernel in kernels/ compiles for sm_80 and sm_90 at the
recipes' shapes, tiles and dtypes, and none spills registers.

``benchmarks/compile_table.py`` does the work in a subprocess (it needs ``TRITON_INTERPRET`` off, which
tests/conftest.py turned on for this process): a stand-in CUDA driver reports the architecture and
Triton's pipeline runs down to ``ptxas`` (``kernels/aot.py``); ``cuobjdump`` reads registers and local
memory (spills) from the cubin. Compiled kernels are cached under ``.cache/triton-aot``.
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from kernels import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed"),
]


def jit_kernels():
    """Names of the ``@triton.jit`` kernels defined in kernels/ (helpers called from kernels, such as
    ``_fc1_preact``, are inlined into them and compile with them)."""
    names = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    ast.unparse(d).endswith("jit") for d in node.decorator_list):
                names.add(node.name)
    return names


def run_compile_table(*args):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton-aot"))
    return subprocess.run([sys.executable, "-m", "benchmarks.compile_table", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 90 s of ptxas: make test, not the before-every-commit tier
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "resources.json"
    proc = run_compile_table("--check", "--jobs", "2", "--out", str(out))
    assert proc.returncode == 0, f"compile tier failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    rows = json.loads(out.read_text())["rows"]
    kernels = jit_kernels()
    assert len(kernels) == 10, kernels  # gather x2, l2, fc1 x2, LN -> linear x3, ema x2
    for arch in ("sm_80", "sm_90"):
        compiled = {r["kernel"] for r in rows if r["arch"] == arch}
        assert compiled == kernels, f"{arch}: not compiled: {kernels - compiled}"
        for kernel in kernels - {"_gather_bwd_kernel"}:  # the scatter-add backward is fp32 only
            dtypes = {r["dtype"] for r in rows if r["arch"] == arch and r["kernel"] == kernel}
            assert dtypes == {"bf16", "fp16", "fp32"}, (arch, kernel, dtypes)
        for recipe in ("ViT-B/16", "ViT-H/14"):
            assert {r["kernel"] for r in rows if r["arch"] == arch and recipe in r["recipes"]} == kernels
    for r in rows:
        assert r["spill_bytes"] == 0 and r["spills"] == 0, r
        assert 0 < r["registers"] <= 255, r
    # the table uses the tiles the launchers use on CUDA (e.g. ViT-H: loss 4 x 2048 whole rows,
    # context gather 16 x 256 column tiles)
    l2_h = {r["tiles"] for r in rows if r["kernel"] == "_masked_l2_fwd_kernel" and "ViT-H/14" in r["recipes"]}
    t = dispatch.TILE_POLICIES["masked_l2_loss"]["cuda"].tiles(1280)
    assert l2_h == {f"{t.block_t}x{t.block_d}"} == {"4x2048"}


def test_a_spill_fails_the_check(tmp_path):
    # capping the registers far below what the EMA kernel needs (about 56) makes ptxas spill: --check
    # must fail and name the kernel
    proc = run_compile_table("--check", "--arch", "90", "--only", "_ema_flat", "--maxnreg", "24")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SPILL: _ema_flat_kernel (flat online) sm_90 bf16 tiles 1x4096" in proc.stderr


def test_a_compile_error_fails(tmp_path):
    # a tile the kernel cannot take (a block of 3000: not a power of two) is a compile error naming the
    # kernel, not a row of the table
    proc = run_compile_table("--arch", "80", "--only", "_ema_flat", "--policy", "ema_update=3000,1,3000")
    assert proc.returncode == 2
    assert "COMPILE ERROR: _ema_flat_kernel (flat online, fp32, tiles 1x3000, 4 warps) does not compile for sm_80" in proc.stderr
