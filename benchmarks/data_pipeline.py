"""Data-pipeline throughput: the two views, the action and the masks of one batch, on one CPU thread.

    python benchmarks/data_pipeline.py [--quick] [--out benchmarks/results/data_pipeline.json]

Times ``engine.views.make_views`` (target jitter, source jitter + destructive ops, action) plus
``engine.masks.MaskSampler.sample`` (ragged multi-block masks; patch 8 at 64 px as the tiny recipe, else
16) for a batch of 32 images at 64, 128 and 224 px, default config, with ``torch.set_num_threads(1)``: img/s per core, from the
process's CPU time (``time.process_time``: user + system, page faults included, time spent waiting for
a core on a shared machine excluded). The loader's decode + crop is not included. Each figure is the
best of several repeats; the median is saved too.

Two allocator settings: glibc's defaults, where the freed temporaries of a batch go back to the OS and
every new tensor page-faults its memory in again (thousands of faults per batch: about a third of the
time at 64 px), and ``mallopt`` (``engine.distributed.keep_freed_memory``, what every CPU rank of the engine
runs) with M_MMAP_THRESHOLD 32 MiB + M_TRIM_THRESHOLD 1 GiB (what
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or a jemalloc / tcmalloc LD_PRELOAD, the PyTorch CPU
tuning guide's advice, also achieve), where freed memory is reused.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from engine.config import MaskConfig, ViewConfig  # noqa: E402
from engine.distributed import keep_freed_memory  # noqa: E402
from engine.masks import MaskSampler  # noqa: E402
from engine.views import make_views  # noqa: E402

SIZES = (64, 128, 224)
BATCH = 32
PATCH = {64: 8, 128: 16, 224: 16}


def time_per_batch(fn, iters: int, repeats: int):
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(iters):
            fn()
        runs.append((time.process_time() - t0) / iters)
    return min(runs), statistics.median(runs)


def run(quick: bool, out) -> dict:
    torch.set_num_threads(1)
    rows = table(quick, "default")
    if keep_freed_memory(environ={}):  # glibc's defaults were timed first
        rows += table(quick, "mallopt")
    result = dict(benchmark="data_pipeline", threads=1, clock="process_time", quick=quick, torch=torch.__version__,
                  cpu=platform.processor() or platform.machine(), rows=rows)
    import kernels_table as kt

    kt.save_json(result, out)
    return result


def table(quick: bool, malloc: str) -> list:
    view_cfg, mask_cfg = ViewConfig(), MaskConfig()
    rows = []
    print(f"\nmalloc {malloc}: batch {BATCH}, one thread, default views + masks; CPU time, "
          f"best of repeats (median)")
    print(f"{'px':>5} {'views ms':>10} {'masks ms':>10} {'total ms':>10} {'img/s/core':>12} {'(median)':>10}")
    for px in SIZES:
        images = torch.rand(BATCH, 3, px, px, generator=torch.Generator().manual_seed(0))
        view_gen, mask_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        sampler = MaskSampler(mask_cfg, px // PATCH[px], px // PATCH[px])
        iters = max(1, (20 if px == 64 else 5) // (4 if quick else 1))
        repeats = 3 if quick else 9
        tv, tv_med = time_per_batch(lambda: make_views(images, view_cfg, view_gen), iters, repeats)
        tm, tm_med = time_per_batch(lambda: sampler.sample(BATCH, mask_gen), iters * 4, repeats)
        both, both_med = time_per_batch(
            lambda: (make_views(images, view_cfg, view_gen), sampler.sample(BATCH, mask_gen)), iters, repeats)
        row = dict(malloc=malloc, px=px, batch=BATCH, views_ms=tv * 1e3, masks_ms=tm * 1e3, total_ms=both * 1e3,
                   img_per_s=BATCH / both, img_per_s_median=BATCH / both_med,
                   views_ms_median=tv_med * 1e3, masks_ms_median=tm_med * 1e3)
        rows.append(row)
        print(f"{px:>5} {row['views_ms']:>10.2f} {row['masks_ms']:>10.2f} {row['total_ms']:>10.2f} "
              f"{row['img_per_s']:>12.0f} {row['img_per_s_median']:>10.0f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data_pipeline.json"))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a few seconds)")
    args = ap.parse_args(argv)
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
