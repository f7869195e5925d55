"""The benchmarks: kernel microbenchmarks, the end-to-end step against a plain-PyTorch peer, data pipeline,
memory (``engine.plan`` against measured peaks), scaling, and the GPU check.

Each script is a module of this package; run it from the repository root as ``python -m benchmarks.X``
(``python -m benchmarks.e2e --quick``, ``python -m benchmarks.gpu_check --dry``), and the pytest-benchmark
cases as ``python -m pytest benchmarks/test_bench_kernels.py --benchmark-enable``. What the scripts share
(the repository root, peak memory, the matmul peak, timing, the JSON writer) is in :mod:`benchmarks.common`;
they import each other as ``from benchmarks import kernels_table as kt``. Results: ``benchmarks/results/``,
tables in ``docs/results.md``.
"""
