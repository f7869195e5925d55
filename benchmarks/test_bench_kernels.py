"""pytest-benchmark microbenchmarks: each fused kernel against its unfused PyTorch composition.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-enable [--benchmark-json out.json]   # from the root

Not collected by the default ``pytest`` run (pytest.ini: ``testpaths = tests``; ``--benchmark-disable``
is in addopts, so without ``--benchmark-enable`` each case runs once, as a smoke test). Shapes: the
ViT-B/16 and ViT-H/14 recipes (benchmarks/kernels_table.py), batch 128 on CUDA; on CPU a batch of 4 and
a 1-block EMA, and the 'fused' Triton cases are skipped there (the interpreter is for correctness, not
speed): only the reference paths and the EMA loop vs foreach run. For peak memory and GB/s, use
``benchmarks/kernels_table.py``.
"""
import functools

import pytest
import torch

from benchmarks import kernels_table as kt

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = {
    "gather_tokens": ["unfused", "fused"],
    "masked_l2_loss": ["unfused", "fused"],
    "feature_conditioning": ["unfused", "fused"],
    "layer_norm_linear": ["unfused", "fused"],
    "ema_update": ["loop (reference)", "foreach", "fused"],
}
PARAMS = [(op, recipe, impl) for recipe in kt.RECIPES for op, impls in IMPLS.items() for impl in impls]


@functools.lru_cache(maxsize=None)
def _case(op, recipe):
    cuda = DEVICE.type == "cuda"
    batch = kt.RECIPES[recipe]["batch"] if cuda else 4
    (case,) = kt.build_cases(recipe, batch, DEVICE, ema_depth=None if cuda else 1, ops=[op])
    return case


@pytest.mark.parametrize("op,recipe,impl", PARAMS, ids=[f"{o}-{r}-{i.split()[0]}" for o, r, i in PARAMS])
def test_bench(benchmark, op, recipe, impl):
    case = _case(op, recipe)
    if impl not in case.impls:
        pytest.skip(f"{impl} needs CUDA (Triton); this run is on {DEVICE.type}")
    fn = case.impls[impl]
    benchmark.group = f"{op} {recipe}"
    benchmark.extra_info.update(shape=case.shape, model_bytes=case.bytes.get(impl), device=str(DEVICE))
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
