"""End-to-end training step, side by side: this engine's IWM step against a plain-PyTorch I-JEPA peer.

    make bench-peer                                   # once: builds .venv-peer (pinned lightly==1.6.0)
    python -m benchmarks.e2e [--quick] [--threads N] [--models ti,s] [--clock wall|cpu] [--set K=V]
                             [--compile] [--out benchmarks/results/e2e.json]
    python -m benchmarks.e2e --profile [--models ti]   # torch.profiler of our step: top ops and phases

**Ours** is the step ``engine.pretrain.pretrain()`` runs: :meth:`engine.run.Run.optimizer_step` on the
Pretraining task (views + action, masks, EMA target encoder, encoder + feature-conditioned predictor,
loss, DeepSpeed ZeRO-1 backward and AdamW update, EMA update), with the engine built by
:meth:`engine.run.Run.build_engine`; the config is ``recipes/pretrain_tiny.py``'s with the model and
image size below (``--set`` adds overrides; ``--compile`` adds the side ``ours-compile``, the same step with
``train.compile=true``, and prints compile on / off). **The peer** is lightly 1.6.0's I-JEPA parts in their own
environment ``.venv-peer``: a timm ViT (lightly's ``MaskedVisionTransformerTIMM``: sin-cos positions,
context tokens kept by index), ``IJEPAMaskCollator``, ``IJEPAPredictorTIMM``, layer-normalised targets,
smooth-L1 loss, torch AdamW and a per-parameter EMA (lightly's I-JEPA example). It runs twice: with the
collator's defaults and with it set as close to our masks as it allows (4 target blocks of 15-20%,
aspect 0.75-1.5, one context block of 85-100%).

Configs: ViT-Ti/16 + predictor 6 x 192 and ViT-S/16 + 6 x 384 (head width 64 everywhere), 128 px, batch
32, fp32, on the CPU. Each side runs in its own subprocess that takes the same images (real crops from
the embedded data set, made once by this script; the loader is outside the timing on both sides, as are
the peer's transforms, and its ImageNet normalisation), warms up, counts one step's FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` (plus the CPU flash-attention ops it does not know), times
``--steps`` steps, and measures a 2048^3 fp32 matmul in the same process (``benchmarks.common.matmul_peak``):
MFU = achieved FLOP/s over that peak. Peak RSS is the resident high-water mark over the timed steps
(``benchmarks.common.reset_peak_rss`` after the warm-up, then ``peak_rss``; ``rss_window`` in the JSON says
"whole process" where the mark could not be reset). The sides
alternate (A/B/A/B) for ``--rounds`` rounds and each figure is the median over rounds. Ours' FLOPs exclude
the views' own small matmuls (colour matrices, blur), reported apart. Both clocks are kept in the JSON: wall
time (the table's by default) and process CPU time per thread (``--clock cpu``: steadier on a shared
machine, where waiting for a core inflates wall time; the matmul peak is taken on the same clock).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import ROOT, matmul_peak, peak_rss, reset_peak_rss

PEER_PYTHON = os.path.join(ROOT, ".venv-peer", "bin", "python")
MODELS = {  # name -> (our encoder, patch, predictor depth, predictor width, heads of encoder / predictor)
    "ti": ("vit_tiny", 16, 6, 192, 3),
    "s": ("vit_small", 16, 6, 384, 6),
}
NAMES = {"ti": "ViT-Ti", "s": "ViT-S"}
ENCODER_DIMS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}
PEER_MASKS = {
    "defaults": {},
    # as close to engine/config.py's MaskConfig as the collator allows
    "matched": dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1,
                    npred=4, min_keep=4, allow_overlap=False),
}
WORK_DIFFERENCES = """What still differs between the sides (besides the method: ours adds the views and the action):
  - tokens: the peer's collator truncates every sample's context and every target block to the batch minimum
    (ours keeps each sample's own counts, packed); its one target block size is drawn per batch, not per block;
    its aspect ratio is uniform (ours log-uniform) and drawn from the same number as the scale; its block corners
    never reach the last row / column.
  - predictor: the peer runs one sequence per target block (context repeated npred times, a patch covered by two
    blocks predicted twice); ours one sequence per sample with the union of the target blocks.
  - ours only: the two photometric views per step (jitter, blur, grayscale, solarize) and the action, the
    feature-conditioning MLP on every target token, the ImageNet normalisation inside the encoder, the DeepSpeed
    engine (ZeRO-1, single rank), a per-sample padded SDPA over the ragged packed batch (the peer: dense SDPA).
  - peer only: smooth-L1 loss (ours squared L2), EMA as a per-parameter loop (ours one flat update)."""


# ---------------------------------------------------------------------------------------------------------
# measurement helpers (both environments: torch only)
# ---------------------------------------------------------------------------------------------------------
def register_cpu_attention_flops() -> None:
    """FlopCounterMode counts the CUDA SDPA kernels but not the CPU flash-attention ones both sides run."""
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, forward),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, backward)):
        if op not in fc.flop_registry:
            fc.register_flop_formula(op)(formula)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_steps(step, steps: int) -> dict:
    """Mean wall and CPU seconds per step (CPU time divided by the threads) over ``steps`` calls."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(i)
    wall = (time.perf_counter() - t0) / steps
    cpu = (time.process_time() - c0) / steps / torch.get_num_threads()
    return {"s_per_step": wall, "cpu_s_per_step": cpu}


def measure(step, flop_step, warmup: int, steps: int) -> dict:
    """The common protocol: FLOPs of one step, warm-up, matmul peak, then the timed steps and their peak RSS."""
    register_cpu_attention_flops()
    flops = count_flops(flop_step)
    for i in range(warmup):
        step(i)
    peak = matmul_peak()
    reset_ok = reset_peak_rss()
    timing = time_steps(step, steps)
    return dict(flop_per_step=flops, matmul_peak_wall=peak["wall"], matmul_peak_cpu=peak["cpu"],
                peak_rss_mb=peak_rss() / 2 ** 20, rss_window="timed steps" if reset_ok else "whole process",
                **timing)


# ---------------------------------------------------------------------------------------------------------
# our side (the project's .venv)
# ---------------------------------------------------------------------------------------------------------
def our_sets(model: str, img: int, batch: int) -> list:
    """The overrides of recipes/pretrain_tiny.py's config that make our side of the comparison."""
    enc, patch, depth, width, heads = MODELS[model]
    return [f"model.encoder={enc}", f"model.patch_size={patch}", f"model.predictor_depth={depth}",
            f"model.predictor_width={width}", f"model.predictor_heads={heads}", f"data.img_size={img}",
            f"data.batch_size={batch}", "train.precision=fp32"]


def our_config(model: str, img: int, batch: int, overrides, out_dir: str):
    from engine.config import load_recipe

    sets = our_sets(model, img, batch) + [f"train.out_dir={out_dir}", *overrides]
    return load_recipe(os.path.join(ROOT, "recipes", "pretrain_tiny.py"), sets).validate()


def our_engine(args, images: torch.Tensor, out_dir: str):
    """(config, Run, Pretraining task, DeepSpeed engine): what ``pretrain()`` builds, for our side's step."""
    from engine.pretrain import Pretraining
    from engine.run import Run, start_process
    from kernels import dispatch

    cfg = our_config(args.model, images.shape[-1], images.shape[1], args.set or [], out_dir)
    info = start_process()
    dispatch.configure(kernels=cfg.train.kernels, attention=cfg.train.attention)
    run, task = Run(cfg, info), Pretraining(cfg, info.device, info.rank)
    return cfg, run, task, run.build_engine(task)


def time_monitors(task, engine, run, calls: int) -> dict:
    """Wall and CPU seconds of the collapse monitors at one log step (``task.monitors``, engine/monitors.py),
    mean over ``calls`` calls on the last step's batch."""
    task.monitors(engine.module, run.autocast)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        task.monitors(engine.module, run.autocast)
    return {"monitor_s": (time.perf_counter() - t0) / calls,
            "cpu_monitor_s": (time.process_time() - c0) / calls / torch.get_num_threads()}


def run_ours(args, images: torch.Tensor) -> dict:
    from engine.run import Meters, Schedule
    from engine.views import make_views

    with tempfile.TemporaryDirectory() as out_dir:
        cfg, run, task, engine = our_engine(args, images, out_dir)
        sched = Schedule(total=10 ** 6, warmup=1000, steps_per_epoch=1000)
        labels = torch.zeros(images.shape[1], dtype=torch.long)
        meters = Meters(run.device)

        def step(i):
            run.optimizer_step(engine, task, i, [(images[i % len(images)], labels)], sched, meters)

        views_flops = count_flops(lambda: make_views(images[0].float() / 255, cfg.views,
                                                     torch.Generator().manual_seed(0)))
        counted = Meters(run.device)  # the FLOP-counted step's tokens
        result = measure(step, lambda: run.optimizer_step(engine, task, 0, [(images[0], labels)], sched, counted),
                         args.warmup, args.steps)
        result.update(time_monitors(task, engine, run, args.steps), log_every=cfg.train.log_every)
    per_img = {k: v / meters.images for k, v in meters.tokens.items()}
    result.update(side="ours", flop_per_step=result["flop_per_step"] - views_flops, views_flop_per_step=views_flops,
                  context_tokens=per_img["context"], target_tokens=per_img["target"],
                  predictor_tokens=per_img["context"] + per_img["target"],
                  loss=meters.loss_sum.item() / meters.micro, recipe="recipes/pretrain_tiny.py",
                  sets=our_sets(args.model, images.shape[-1], images.shape[1]) + (args.set or []))
    return result


PHASES = (("engine.run", "to_float_images", "uint8 -> float"), ("engine.pretrain", "make_views", "views + action"),
          ("engine.pretrain", "iwm_loss", "loss"))


def _annotate(fn, name: str):
    def wrapped(*a, **k):
        with torch.profiler.record_function(f"phase: {name}"):
            return fn(*a, **k)
    return wrapped


def profile_ours(args, images: torch.Tensor) -> None:
    """torch.profiler over ``--steps`` of our step (after warm-up): the top ops by self CPU time, and the step
    split into phases (record_function around the step's parts, set up here by wrapping them)."""
    import importlib

    from engine.run import Meters, Schedule

    with tempfile.TemporaryDirectory() as out_dir:
        cfg, run, task, engine = our_engine(args, images, out_dir)
        for module, attr, name in PHASES:
            mod = importlib.import_module(module)
            setattr(mod, attr, _annotate(getattr(mod, attr), name))
        task.mask_sampler.sample = _annotate(task.mask_sampler.sample, "masks")
        task.target_encoder.module.forward = _annotate(task.target_encoder.module.forward, "target encoder")
        engine.module.encoder.forward = _annotate(engine.module.encoder.forward, "encoder (context)")
        engine.module.predictor.forward = _annotate(engine.module.predictor.forward, "predictor")
        engine.backward = _annotate(engine.backward, "backward")
        engine.step = _annotate(engine.step, "optimizer (engine.step)")
        task.after_update = _annotate(task.after_update, "EMA update")
        sched, meters = Schedule(total=10 ** 6, warmup=1000, steps_per_epoch=1000), Meters(run.device)
        labels = torch.zeros(images.shape[1], dtype=torch.long)

        def step(i):
            with torch.profiler.record_function("phase: step"):
                run.optimizer_step(engine, task, i, [(images[i % len(images)], labels)], sched, meters)

        for i in range(args.warmup):
            step(i)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(i)
    print_profile(prof, args.steps)


def print_profile(prof, steps: int) -> None:
    events = prof.key_averages()
    phases = {e.key[len("phase: "):]: e.cpu_time_total / steps / 1e3 for e in events if e.key.startswith("phase: ")}
    total = phases.pop("step")
    print(f"\nour step, {steps} profiled steps: {total:.0f} ms per step (CPU time of the profiled thread)")
    print(f"{'phase':<26}{'ms/step':>9}{'share':>8}")
    for name, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"{name:<26}{ms:>9.1f}{ms / total:>8.1%}")
    data = phases.get("views + action", 0) + phases.get("masks", 0)
    print(f"{'views + action + masks':<26}{data:>9.1f}{data / total:>8.1%}")
    ops = sorted((e for e in events if not e.key.startswith("phase: ")), key=lambda e: -e.self_cpu_time_total)
    print(f"\ntop ops by self CPU time\n{'op':<48}{'ms/step':>9}{'share':>8}{'calls/step':>11}")
    for e in ops[:25]:
        ms = e.self_cpu_time_total / steps / 1e3
        print(f"{e.key[:47]:<48}{ms:>9.1f}{ms / total:>8.1%}{e.count / steps:>11.0f}")


def make_images(args) -> torch.Tensor:
    """[n, B, 3, H, W] uint8: real training crops (the embedded set, the loader's crop + flip)."""
    from engine.data import build_dataset, build_loader

    cfg = our_config("ti", args.img, args.batch, [], "unused")
    dataset = build_dataset(cfg.data, cfg.views, split="train")
    loader = build_loader(dataset, args.batch, 0, shuffle=True, drop_last=True, seed=0, seeded_crops=True)
    loader.sampler.set_epoch(0)
    batches = []
    for images, _ in loader:
        batches.append(images)
        if len(batches) == 4:
            break
    return torch.stack(batches)


# ---------------------------------------------------------------------------------------------------------
# the peer (.venv-peer: torch, timm, lightly)
# ---------------------------------------------------------------------------------------------------------
def build_peer(model: str, img: int, masks: str):
    from lightly.data import IJEPAMaskCollator
    from lightly.models.modules import IJEPAPredictorTIMM, MaskedVisionTransformerTIMM
    from timm.models.vision_transformer import VisionTransformer

    enc, patch, depth, width, heads = MODELS[model]
    dim, enc_depth, enc_heads = ENCODER_DIMS[enc]
    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=enc_depth, num_heads=enc_heads,
                            qkv_bias=True, class_token=False, global_pool="", num_classes=0)
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    target = copy.deepcopy(encoder).requires_grad_(False).eval()
    predictor = IJEPAPredictorTIMM(num_patches=(img // patch) ** 2, depth=depth, mlp_dim=dim,
                                   predictor_embed_dim=width, num_heads=heads)
    collator = IJEPAMaskCollator(input_size=img, patch_size=patch, **PEER_MASKS[masks])
    return encoder, target, predictor, collator


def run_peer(args, images: torch.Tensor) -> dict:
    import lightly
    import torch.nn.functional as F
    from lightly.models import utils

    torch.manual_seed(0)
    encoder, target, predictor, collator = build_peer(args.model, images.shape[-1], args.peer_masks)
    params = list(encoder.parameters()) + list(predictor.parameters())
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1.5e-4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    batches = [(b.float() / 255 - mean) / std for b in images]  # its transform's job, in its loader
    B = images.shape[1]
    tokens = {"context": 0, "target": 0, "predictor": 0, "images": 0, "loss": 0.0}

    def step(i):
        imgs = batches[i % len(batches)]
        _, masks_enc, masks_pred = collator([0] * B)  # the masks (the labels it also collates are dummies)
        with torch.no_grad():
            h = target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = utils.apply_masks(h, masks_pred)
            h = utils.repeat_interleave_batch(h, B, repeat=len(masks_enc))
        z = encoder(imgs, idx_keep=masks_enc[0])
        z = predictor(z, masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # lightly's I-JEPA example: one update per parameter
            for q, k in zip(encoder.parameters(), target.parameters()):
                k.data.mul_(0.996).add_((1.0 - 0.996) * q.detach().data)
        n_ctx, n_tgt = masks_enc[0].shape[1], sum(m.shape[1] for m in masks_pred)
        tokens["context"] += n_ctx * B
        tokens["target"] += n_tgt * B
        tokens["predictor"] += (len(masks_pred) * n_ctx + n_tgt) * B
        tokens["images"] += B
        tokens["loss"] += loss.item()

    result = measure(step, lambda: step(0), args.warmup, args.steps)
    n = tokens["images"]
    result.update(side="peer", masks=args.peer_masks, collator=PEER_MASKS[args.peer_masks],
                  lightly=lightly.__version__, context_tokens=tokens["context"] / n,
                  target_tokens=tokens["target"] / n, predictor_tokens=tokens["predictor"] / n,
                  loss=tokens["loss"] * B / n)
    return result


# ---------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------
def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    images = torch.load(args.images)
    if args.profile:
        profile_ours(args, images)
        return
    result = run_ours(args, images) if args.side == "ours" else run_peer(args, images)
    result.update(model=args.model, threads=args.threads, steps=args.steps, warmup=args.warmup,
                  batch=images.shape[1], img=images.shape[-1], torch=torch.__version__)
    print("E2E_RESULT " + json.dumps(result))


def run_child(python: str, args, side: str, model: str, images_path: str, peer_masks: str = "") -> dict:
    """One side's subprocess; ``peer_masks`` is the peer's collator setting, or for our side 'compile'
    (train.compile=true on top of ``--set``)."""
    cmd = [python, "-m", "benchmarks.e2e", "--child", "--side", side, "--model", model, "--images", images_path,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if peer_masks and side == "peer":
        cmd += ["--peer-masks", peer_masks]
    for s in (args.set or []) + (["train.compile=true"] if side == "ours" and peer_masks == "compile" else []):
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])
    raise RuntimeError(f"{side} ({model} {peer_masks}) failed, exit {proc.returncode}:\n{proc.stderr[-3000:]}")


def peer_available() -> bool:
    if not os.path.exists(PEER_PYTHON):
        return False
    probe = subprocess.run([PEER_PYTHON, "-c", "import lightly, timm; assert lightly.__version__ == '1.6.0'"],
                           capture_output=True)
    return probe.returncode == 0


def summarise(runs: list) -> dict:
    """Medians over the rounds of one side, plus the derived rates."""
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("s_per_step", "cpu_s_per_step", "peak_rss_mb", "flop_per_step", "matmul_peak_wall", "matmul_peak_cpu",
            "context_tokens", "target_tokens", "predictor_tokens")}
    batch = runs[0]["batch"]
    if "monitor_s" in runs[0]:  # ours: the collapse monitors' share of a step, at a log step and per step
        for c in ("", "cpu_"):
            med[c + "monitor_fraction"] = statistics.median(r[c + "monitor_s"] / r[c + "s_per_step"] for r in runs)
        med["log_every"] = runs[0]["log_every"]
    med["img_per_s"] = batch / med["s_per_step"]
    med["img_per_s_cpu"] = batch / med["cpu_s_per_step"]
    med["flop_per_s"] = statistics.median(r["flop_per_step"] / r["s_per_step"] for r in runs)
    med["flop_per_s_cpu"] = statistics.median(r["flop_per_step"] / r["cpu_s_per_step"] for r in runs)
    med["mfu"] = statistics.median(r["flop_per_step"] / r["s_per_step"] / r["matmul_peak_wall"] for r in runs)
    med["mfu_cpu"] = statistics.median(r["flop_per_step"] / r["cpu_s_per_step"] / r["matmul_peak_cpu"]
                                       for r in runs)
    return med


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer for img/s (raw), achieved FLOP/s (FLOP-normalised) and MFU, on both clocks."""
    return {k + c: ours[k + c] / peer[k + c] for k in ("img_per_s", "flop_per_s", "mfu") for c in ("", "_cpu")}


def print_table(model: str, sides: dict, args) -> None:
    c = "_cpu" if args.clock == "cpu" else ""
    print(f"\n{NAMES[model]}/16 + predictor {MODELS[model][2]}x{MODELS[model][3]}, {args.img} px, batch {args.batch}, "
          f"fp32, {args.threads} thread(s), {args.clock} clock; median of {args.rounds} alternating rounds of "
          f"{args.steps} steps")
    head = (f"{'side':<15}{'s/step':>7}{'img/s':>7}{'RSS MB':>7}{'GFLOP/step':>11}{'GFLOP/s':>8}{'peak':>6}"
            f"{'MFU':>6}{'ctx tok':>8}{'tgt tok':>8}{'pred tok':>9}")
    print(head)
    print("-" * len(head))
    for name, s in sides.items():
        peak = s["matmul_peak_cpu" if c else "matmul_peak_wall"]
        print(f"{name:<15}{s['cpu_s_per_step' if c else 's_per_step']:>7.3f}{s['img_per_s' + c]:>7.1f}"
              f"{s['peak_rss_mb']:>7.0f}{s['flop_per_step'] / 1e9:>11.1f}{s['flop_per_s' + c] / 1e9:>8.1f}"
              f"{peak / 1e9:>6.0f}{s['mfu' + c]:>6.2f}{s['context_tokens']:>8.1f}{s['target_tokens']:>8.1f}"
              f"{s['predictor_tokens']:>9.1f}")
    if "ours-compile" in sides:
        r = ratios(sides["ours-compile"], sides["ours"])
        print(f"compile on / off (train.compile): img/s {r['img_per_s' + c]:.3f}x, over the timed steps after "
              f"{args.warmup} warm-up steps (the compile happens in the warm-up)")
    if "monitor_fraction" in sides.get("ours", {}):
        f = sides["ours"]["cpu_monitor_fraction" if c else "monitor_fraction"]
        print(f"ours: collapse monitors at a log step {100 * f:.2f}% of a step, {100 * f / sides['ours']['log_every']:.2f}% "
              f"per step at the recipe's train.log_every={sides['ours']['log_every']}")
    for name, s in sides.items():
        if name not in ("ours", "ours-compile") and "ours" in sides:
            r = ratios(sides["ours"], s)
            print(f"ours / {name}: img/s {r['img_per_s' + c]:.2f}x raw, {r['flop_per_s' + c]:.2f}x FLOP-normalised "
                  f"(achieved FLOP/s), MFU {r['mfu' + c]:.2f}x")


def side_name(side: str, variant: str) -> str:
    """'ours', 'ours-compile' (train.compile=true), 'peer-defaults', 'peer-matched'."""
    return side + (f"-{variant}" if variant else "")


def run_model(model: str, images_path: str, args, with_peer: bool) -> dict:
    plan = ([("ours", "")] + ([("ours", "compile")] if args.compile else [])
            + ([("peer", "defaults"), ("peer", "matched")] if with_peer else []))
    raw = {side_name(side, masks): [] for side, masks in plan}
    for r in range(args.rounds):
        for side, masks in (plan if r % 2 == 0 else plan[::-1]):  # A/B/A/B
            python = sys.executable if side == "ours" else PEER_PYTHON
            res = run_child(python, args, side, model, images_path, masks)
            raw[side_name(side, masks)].append(res)
            print(f"  round {r + 1}: {side:<4} {masks:<8} {res['s_per_step']:.3f} s/step "
                  f"(cpu {res['cpu_s_per_step']:.3f})", flush=True)
    sides = {name: summarise(runs) for name, runs in raw.items()}
    print_table(model, sides, args)
    return {"sides": sides, "ratios": {n: ratios(sides["ours"], s) for n, s in sides.items() if n != "ours"},
            "runs": raw}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke check: ViT-Ti only, 1 round of 2 steps")
    ap.add_argument("--models", default="ti,s", help="comma-separated: ti, s")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per run (default 3; --quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads())
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="the table's clock: wall time, or process CPU time per thread (steadier on a shared machine)")
    ap.add_argument("--img", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--set", action="append", help="extra config override for our side, e.g. train.precision=fp32")
    ap.add_argument("--compile", action="store_true",
                    help="also run our side with train.compile=true (side 'ours-compile'; its warm-up steps compile)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over our step instead (top ops and phases), --model ti unless --models")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "e2e.json"))
    # the subprocess side of the protocol
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--peer-masks", choices=sorted(PEER_MASKS), default="defaults", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.quick and args.models == "ti,s":
        args.models = "ti"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            args.images = os.path.join(tmp, "images.pt")
            torch.save(make_images(args), args.images)
            args.model = args.models.split(",")[0]
            torch.set_num_threads(args.threads)
            profile_ours(args, torch.load(args.images))
        return 0
    with_peer = peer_available()
    if not with_peer:
        print("the peer is not built: run `make bench-peer` (creates .venv-peer with the pinned lightly==1.6.0 and "
              "this project's torch / torchvision / timm pins); timing our side only", file=sys.stderr)
    result = dict(benchmark="e2e", clock=args.clock, threads=args.threads, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                  img=args.img, batch=args.batch, quick=args.quick, peer=with_peer, set=args.set or [],
                  torch=torch.__version__, cpu=platform.processor() or platform.machine(), models={})
    with tempfile.TemporaryDirectory() as tmp:
        images_path = os.path.join(tmp, "images.pt")
        torch.save(make_images(args), images_path)
        for model in args.models.split(","):
            result["models"][model] = run_model(model, images_path, args, with_peer)
    if with_peer:
        print("\n" + WORK_DIFFERENCES)
    if args.out:
        from engine.checkpoint import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, result)
        print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
