"""Check engine.plan's memory model against measured peak memory of small configs on the CPU.

    python -m benchmarks.plan_validation [--json benchmarks/results/plan_validation.json]

Each config runs in its own subprocess: it builds ``engine.models.IWM`` and its fp32 target encoder
(``engine.ema.TargetEncoder``), a torch AdamW, draws masks from ``engine.masks.MaskSampler`` and runs two
forward + backward + step iterations (the second one with the AdamW moments allocated, as in a run).
The measured figure is the resident high-water mark of that part alone (``benchmarks.common``: VmHWM,
restarted after the imports) minus the RSS after imports.
``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB so that glibc serves every tensor from mmap and returns
it when freed (with the default dynamic threshold, freed heap memory stays resident and RSS measures
the allocator's history, not the live tensors). The estimate is ``engine.plan.memory_plan`` for ZeRO
stage 0 on one process, fp32, the sdpa (padded) attention of the CPU path, and no CUDA overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import ROOT, current_rss, peak_rss, reset_peak_rss, save_json

# name: (img_size, patch, width, depth, heads, predictor depth, predictor width, predictor heads, batch)
CONFIGS = {
    "vit_ti_64px_b32": (64, 8, 192, 12, 3, 6, 192, 6, 32),
    "vit_s_96px_b16": (96, 8, 384, 12, 6, 6, 192, 6, 16),
    "vit_b_128px_b16": (128, 16, 768, 12, 12, 6, 384, 12, 16),
    "vit_s_128px_b8_seq": (128, 8, 384, 6, 6, 4, 256, 8, 8),
}
QUICK = "vit_ti_64px_b32"  # the one the test suite measures


def make_config(name: str):
    from engine.config import IWMConfig

    img, patch, width, depth, heads, pdepth, pwidth, pheads, batch = CONFIGS[name]
    cfg = IWMConfig(name=name)
    cfg.data.img_size, cfg.data.batch_size = img, batch
    cfg.model.encoder, cfg.model.patch_size = "custom", patch
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = width, depth, heads
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = pdepth, pwidth, pheads
    cfg.model.conditioning = "sequence" if name.endswith("_seq") else "feature"
    return cfg.validate()


def measure_in_process(name: str, steps: int = 2) -> dict:
    """Runs in the child: the peak RSS of the measured part over the RSS after imports, in bytes.

    Recorded: ``peak_increase`` (the resident high-water mark over the model's build and ``steps`` iterations,
    restarted after the imports, minus ``rss_after_imports``), ``rss_after_imports``,
    ``import_peak_above_baseline`` (the high-water mark before the restart minus the baseline: what the
    imports' own peak would have added to a lifetime maximum, when positive; the reset leaves it out),
    ``peak_reset`` (False where the mark could not be restarted: ``peak_increase`` is then the lifetime
    maximum's) and the mean token counts."""
    import torch

    from engine.masks import MaskSampler
    from engine.ema import TargetEncoder
    from engine.models import IWM
    from kernels.l2_loss import masked_l2_loss

    torch.set_num_threads(1)
    cfg = make_config(name)
    baseline = current_rss()
    peak_before = peak_rss()
    reset = reset_peak_rss()
    torch.manual_seed(0)
    model = IWM(cfg)
    target_encoder = TargetEncoder(model.encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = MaskSampler(cfg.masks, *model.encoder.grid)
    gen = torch.Generator().manual_seed(0)
    B, img = cfg.data.batch_size, cfg.data.img_size
    ctx, tgt = [], []
    for _ in range(steps):
        source_view, target_view = torch.randn(B, 3, img, img), torch.randn(B, 3, img, img)
        action = torch.randn(B, cfg.views.action_dim)
        masks = sampler.sample(B, gen)
        ctx += masks.context_counts
        tgt += masks.target_counts
        with torch.no_grad():
            target_feats = target_encoder(target_view)
        pred = model(source_view, masks, action)
        loss = masked_l2_loss(pred, target_feats, masks.flat_target())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del pred, loss, target_feats, masks, source_view, target_view, action
    peak = peak_rss()
    return {"name": name, "peak_increase": peak - baseline, "rss_after_imports": baseline,
            "import_peak_above_baseline": peak_before - baseline, "peak_reset": reset,
            "mean_context": sum(ctx) / len(ctx), "mean_target": sum(tgt) / len(tgt)}


def measure(name: str) -> dict:
    """Spawn a fresh interpreter for `name` (a clean heap per config)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT,
               IWM_KERNELS="reference", IWM_ATTENTION="sdpa")
    out = subprocess.run([sys.executable, "-m", "benchmarks.plan_validation", "--child", name], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(name: str) -> dict:
    from engine.plan import PRECISIONS, memory_plan, token_stats

    cfg = make_config(name)
    tok = token_stats(cfg, cfg.data.batch_size)
    mem = memory_plan(cfg, stage=0, ranks=1, prec=PRECISIONS["fp32"], checkpointing=False, tok=tok,
                      attention="padded", overhead_bytes=0.0)
    return {"estimate": mem.total, "breakdown_mib": {k: v * 1024 for k, v in mem.gib().items()},
            "peak_phase": mem.peak_phase}


def validate(names) -> list:
    rows = []
    for name in names:
        m, e = measure(name), estimate(name)
        rows.append({"config": name, "shape": dict(zip(
            ["img_size", "patch", "width", "depth", "heads", "pred_depth", "pred_width", "pred_heads", "batch"],
            CONFIGS[name])), "measured_mib": m["peak_increase"] / 2 ** 20, "estimate_mib": e["estimate"] / 2 ** 20,
            "ratio": e["estimate"] / m["peak_increase"], "peak_phase": e["peak_phase"],
            "estimate_breakdown_mib": e["breakdown_mib"], "measured": m})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "plan_validation.json"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure_in_process(args.child)))
        return 0
    rows = validate(args.configs)
    print(f"{'config':<22} {'estimate MiB':>12} {'measured MiB':>12} {'est/meas':>8}  peak at")
    for r in rows:
        print(f"{r['config']:<22} {r['estimate_mib']:12.1f} {r['measured_mib']:12.1f} {r['ratio']:8.3f}  "
              f"{r['peak_phase']}")
    save_json({"configs": rows, "tolerance": 0.25,
               "method": "peak RSS increase over the RSS after imports (the high-water mark restarted after them), "
                         "MALLOC_MMAP_THRESHOLD_=65536; "
                         "estimate: engine.plan.memory_plan(stage 0, 1 rank, fp32, padded attention)"}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
