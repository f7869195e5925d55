"""Data-pipeline throughput: the loader (decode + crop) from an ImageFolder and from tar shards, and the two
views, the action and the masks of one batch, on one CPU thread.

    python -m benchmarks.data_pipeline [--quick] [--part all|loader|views] [--workers 1 2 4]
        [--out benchmarks/results/data_pipeline.json]

**Loader** (``--part loader``): the training loader as the engine builds it (``engine.data.build_loader`` with
per-sample seeded crops, batch 32, shuffled) over the same synthetic JPEGs (ImageNet-like: 500 x 375, quality
90, the embedded set's shapes at that size, about 25 KB each) as an ImageFolder and as WebDataset shards
(``python -m engine.data shard``), at 224 px, with 0 (the main process) and 1..N loader workers: img/s (wall)
and img/s per core (images / CPU seconds of the main process and every worker, decode, crop and collation
included; the files are in the page cache, so this is the CPU cost, not the disk). From the per-core rate
and the step time ``engine.plan`` predicts for the ViT-B and ViT-H recipes (H100, MFU 0.4, the recipe's ZeRO
stage, at the GPU count its docstring launches), it prints how many loader workers each GPU needs.

**Views** (``--part views``):
times ``engine.views.make_views`` (target jitter, source jitter + destructive ops, action) plus
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
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.common import ROOT, save_json
from engine.config import MaskConfig, ViewConfig
from engine.distributed import keep_freed_memory
from engine.masks import MaskSampler
from engine.views import make_views

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


def run(quick: bool, out, part: str = "all", workers=(1, 2, 4), images: int = 0) -> dict:
    torch.set_num_threads(1)
    result = {}
    if part != "all" and out and os.path.isfile(out):  # one part rerun: keep the other part's figures
        with open(out) as f:
            result = json.load(f)
    result.update(benchmark="data_pipeline", threads=1, clock="process_time", quick=quick, torch=torch.__version__,
                  cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    if part in ("all", "views"):
        rows = table(quick, "default")
        if keep_freed_memory(environ={}):  # glibc's defaults were timed first
            rows += table(quick, "mallopt")
        result["rows"] = rows
    if part in ("all", "loader"):
        result["loader"] = loader_table(quick, workers, images)
        result["workers_per_gpu"] = workers_per_gpu(result["loader"])
    save_json(result, out)
    return result


# ----------------------------------------------------------------------------------------------------
# The loader: ImageFolder against tar shards
# ----------------------------------------------------------------------------------------------------
LOADER_PX, LOADER_BATCH = 224, 32
RECIPE_GPUS = {"pretrain_vitb_equi": 8, "pretrain_vith": 16}  # the GPU counts their docstrings launch


def synthetic_folder(root: str, images: int) -> None:
    """ImageNet-like JPEGs (500 x 375, quality 90) of the embedded set's 10 classes, in class subfolders."""
    from PIL import Image

    from engine.data import EmbeddedShapes

    shapes = EmbeddedShapes(num_classes=10, per_class=math.ceil(images / 10), size=500)
    for i in range(images):
        folder = os.path.join(root, shapes.classes[shapes.label(i)])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(shapes.array(i)).crop((0, 62, 500, 437)).save(os.path.join(folder, f"{i:06d}.jpg"),
                                                                       quality=90)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (loader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(path: str, workers: int) -> dict:
    """One shuffled epoch of the training loader over ``path``: wall and CPU time, workers joined."""
    from engine.config import DataConfig, ViewConfig
    from engine.data import build_dataset, build_loader

    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    ds = build_dataset(DataConfig(dataset=path, img_size=LOADER_PX), ViewConfig(), "train")
    loader = build_loader(ds, LOADER_BATCH, workers, shuffle=True, drop_last=True, seed=0, pin_memory=False,
                          seeded_crops=True)
    gc.collect()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    images = sum(x.shape[0] for x, _ in loader)
    wall = time.perf_counter() - wall0
    del loader  # persistent workers exit and are joined: their CPU time is now counted
    gc.collect()
    cpu = cpu_seconds() - cpu0
    return dict(images=images, wall_s=wall, cpu_s=cpu, img_per_s=images / wall, img_per_s_per_core=images / cpu)


def loader_table(quick: bool, workers, images: int = 0) -> list:
    from engine.data.shards import write_shards

    n = images or (256 if quick else 1024)
    tmp = tempfile.mkdtemp(prefix="data_pipeline_")
    try:
        folder, shards = os.path.join(tmp, "folder"), os.path.join(tmp, "shards")
        synthetic_folder(folder, n)
        index = write_shards(folder, shards, samples_per_shard=128)
        kb = sum(s["bytes"] for s in index["shards"]) / n / 1024
        print(f"\nloader: {n} synthetic JPEGs (500 x 375, q90, {kb:.0f} KB each), crop to {LOADER_PX} px, batch "
              f"{LOADER_BATCH}, one shuffled epoch; {os.cpu_count()} cores; best of {1 if quick else 2} epochs")
        print(f"{'source':>12} {'workers':>8} {'img/s':>8} {'img/s/core':>11}")
        rows = []
        for source, path in (("imagefolder", folder), ("shards", shards)):
            for w in (0, *workers):
                best = max((time_loader(path, w) for _ in range(1 if quick else 2)),
                           key=lambda r: r["img_per_s_per_core"])
                rows.append(dict(source=source, workers=w, px=LOADER_PX, batch=LOADER_BATCH, jpeg_kb=kb, **best))
                print(f"{source:>12} {w:>8} {best['img_per_s']:>8.0f} {best['img_per_s_per_core']:>11.0f}")
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def workers_per_gpu(rows: list) -> list:
    """Loader workers per GPU that keep up with the predicted step: img/s per GPU / img/s per worker (a worker
    is one core; the per-core rate is the median over the worker counts measured)."""
    from engine.config import load_recipe
    from engine.plan import plan

    per_core = {src: statistics.median(r["img_per_s_per_core"] for r in rows if r["source"] == src and r["workers"])
                for src in ("imagefolder", "shards")}
    out = []
    print(f"\nloader workers per GPU at the step time engine.plan predicts (H100, MFU 0.4, the recipe's ZeRO stage)")
    print(f"{'recipe':>20} {'GPUs':>5} {'step s':>7} {'img/s/GPU':>10} {'ImageFolder':>12} {'shards':>7} {'recipe sets':>12}")
    for name, gpus in RECIPE_GPUS.items():
        cfg = load_recipe(os.path.join(ROOT, "recipes", f"{name}.py"))
        p = plan(cfg, gpus)
        row = next(r for r in p["rows"] if r["zero_stage"] == cfg.train.zero_stage
                   and r["activation_checkpointing"] == cfg.train.activation_checkpointing)
        need = row["time"]["images_per_s"] / gpus
        w = {src: math.ceil(need / rate) for src, rate in per_core.items()}
        out.append(dict(recipe=name, gpus=gpus, step_s=row["time"]["step_s"], img_per_s_per_gpu=need,
                        per_core=per_core, workers_imagefolder=w["imagefolder"], workers_shards=w["shards"],
                        recipe_num_workers=cfg.data.num_workers))
        print(f"{name:>20} {gpus:>5} {row['time']['step_s']:>7.2f} {need:>10.0f} {w['imagefolder']:>12} "
              f"{w['shards']:>7} {cfg.data.num_workers:>12}")
    return out


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
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and images (under a minute)")
    ap.add_argument("--part", choices=("all", "loader", "views"), default="all")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="loader worker counts to time")
    ap.add_argument("--images", type=int, default=0, help="synthetic images for the loader (default 1024, quick 256)")
    args = ap.parse_args(argv)
    run(args.quick, args.out, args.part, tuple(args.workers), args.images)


if __name__ == "__main__":
    main()
