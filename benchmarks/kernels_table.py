"""Kernel microbenchmarks: each fused op against its unfused PyTorch composition, time and peak memory.

    python -m benchmarks.kernels_table [--out benchmarks/results/kernels.json] [--quick]

Shapes come from the two pretraining recipes, loaded from ``recipes/pretrain_vitb_equi.py`` (ViT-B/16,
predictor 384 wide) and ``recipes/pretrain_vith.py`` (ViT-H/14, predictor 512 wide) by
:func:`recipe_shapes`: batch per GPU, patch grid, encoder and predictor widths, action dimension, the
encoder's parameter tensors (the module built on the meta device), and ragged per-sample target /
context counts drawn by the engine's mask sampler with the recipe's mask config.

Each row times one forward + backward (the EMA: one update) and measures the peak memory it allocates
on top of its inputs. On CUDA the fused rows run the Triton kernels and every row also reports achieved
GB/s (the analytic bytes that implementation moves / its time) against the device's peak bandwidth.
On CPU the Triton kernels cannot run (only under the interpreter, which is for correctness, not
speed): the table then runs the reference (unfused) paths and, for the EMA, the loop vs the foreach
fast path, at a reduced batch, and says so. Peak memory on CPU comes from the profiler's allocation
events. ``--quick`` makes the CPU run finish in well under a minute.

The analytic bytes-moved estimate (unfused vs fused, per op) is :func:`bytes_moved`; the script
always prints it for the full ViT-H/14 shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks.common import ROOT, allocated_peak, save_json, time_fn
from kernels import dispatch
from kernels.ema import FlatBuffer, ema_update_flat_, ema_update_reference
from kernels.feature_conditioning import FeatureConditioningFunction, feature_conditioning_reference
from kernels.gather import GatherTokensFunction, gather_tokens_reference
from kernels.l2_loss import MaskedL2LossFunction, masked_l2_loss_reference
from kernels.layer_norm_linear import LayerNormLinearFunction, layer_norm_linear_reference

RECIPE_FILES = {"ViT-B/16": "recipes/pretrain_vitb_equi.py", "ViT-H/14": "recipes/pretrain_vith.py"}


def load_recipe_config(path: str):
    """The ``config()`` of a recipe file (path relative to the repository root)."""
    from engine.config import load_recipe

    return load_recipe(os.path.join(ROOT, path))


@functools.lru_cache(maxsize=None)
def recipe_shapes(name: str) -> dict:
    """Kernel-relevant sizes of recipe ``name`` (a key of :data:`RECIPE_FILES`), from its config."""
    cfg = load_recipe_config(RECIPE_FILES[name])
    width, depth, heads = cfg.model.encoder_dims()
    grid = cfg.data.img_size // cfg.model.patch_size
    return dict(cfg=cfg, batch=cfg.data.batch_size, grid=grid, patches=grid * grid, enc_width=width, depth=depth,
                heads=heads, patch=cfg.model.patch_size, pred_width=cfg.model.predictor_width,
                action_dim=cfg.views.action_dim)


RECIPES = {name: recipe_shapes(name) for name in RECIPE_FILES}


def encoder_param_shapes(recipe: str, depth: Optional[int] = None) -> List[Tuple[int, ...]]:
    """Parameter shapes of the recipe's encoder (built on the meta device: no memory, no init cost);
    ``depth`` replaces the number of blocks (the CPU run's reduced EMA)."""
    from engine.models import Encoder

    cfg = RECIPES[recipe]["cfg"]
    if depth is not None:
        cfg = copy.deepcopy(cfg)
        width, _, heads = cfg.model.encoder_dims()
        cfg.model.encoder, cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = "custom", width, depth, heads
    with torch.device("meta"):
        return [tuple(p.shape) for p in Encoder(cfg).parameters()]


def recipe_counts(recipe: str, batch: int, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Per-sample target and context token counts of one batch, drawn by the engine's mask sampler
    with the recipe's mask config (ragged: they vary per sample)."""
    from engine.masks import MaskSampler

    r = RECIPES[recipe]
    masks = MaskSampler(r["cfg"].masks, r["grid"], r["grid"]).sample(batch, torch.Generator().manual_seed(seed))
    return list(masks.target_counts), list(masks.context_counts)


# HBM peak bandwidth (GB/s) by device name, used when the driver does not report clock and bus width
_PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
              "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "A10": 600.0, "V100": 900.0}


# ----------------------------------------------------------------------------------------------------
# Analytic bytes moved (HBM reads + writes, forward + backward)
# ----------------------------------------------------------------------------------------------------
def bytes_moved(op: str, *, B: int, N: int, D: int, T: int, H: Optional[int] = None, Dout: Optional[int] = None,
                A: int = 7, act: int = 2, params: int = 0, online: int = 4) -> Dict[str, Dict]:
    """Estimated bytes each implementation reads + writes for one forward + backward (EMA: one update).

    ``act``: bytes per activation element (2 = bf16 under autocast, 4 = fp32). Counted: every
    elementwise pass, matmul operands/results once, index scatters' source. Not counted: the small
    per-position / per-sample tensors (``[N, H]``, ``[B, A]``, weights), which stay in L2, and the
    random-access reads of ``P`` rows in feature conditioning (N x H = 256 KB for ViT-H: L2-resident).
    Returns ``{impl: {"total": bytes, "terms": {what: bytes}}}``.
    """
    def pack(terms):
        return {"total": int(sum(terms.values())), "terms": {k: int(v) for k, v in terms.items()}}

    if op == "gather_tokens":  # x [B, N, D] -> [T, D]
        fwd = {"fwd: read T rows + write [T, D]": 2 * T * D * act}
        unfused = dict(fwd, **{"bwd: zero-fill [B, N, D]": B * N * D * act,
                               "bwd: index_put_(accumulate): read grad + RMW rows": 3 * T * D * act})
        if act == 4:
            fused_bwd = {"bwd: zero-fill fp32 [B, N, D]": B * N * D * 4,
                         "bwd: read grad + fp32 atomic RMW rows": T * D * 4 + 2 * T * D * 4}
        else:
            fused_bwd = {"bwd: zero-fill [B, N, D]": B * N * D * act,
                         "bwd: index_add_: read grad + RMW rows": 3 * T * D * act}
        return {"unfused": pack(unfused), "fused": pack(dict(fwd, **fused_bwd))}

    if op == "masked_l2_loss":  # pred [T, D] (act), target [B, N, D] (act); fp32 math
        TD = T * D
        up = 0 if act == 4 else 1  # .float() is a no-op copy-free when already fp32
        unfused = {
            "fwd: gather target rows": 2 * TD * act,
            "fwd: target.float()": up * TD * (act + 4),
            "fwd: layer_norm (read + write fp32)": 8 * TD,
            "fwd: pred.float()": up * TD * (act + 4),
            "fwd: pred - t": 12 * TD,
            "fwd: (.)**2": 8 * TD,
            "fwd: mean": 4 * TD,
            "bwd: mean backward (expand / numel)": 4 * TD,
            "bwd: pow backward (grad * 2 * diff)": 12 * TD,
            "bwd: to(pred.dtype)": up * TD * (4 + act),
        }
        fused = {
            "fwd: read pred + gathered target rows": 2 * TD * act,
            "fwd: write d loss / d pred": TD * act,
            "bwd: grad * grad_output (read + write)": 2 * TD * act,
        }
        return {"unfused": pack(unfused), "fused": pack(fused)}

    if op == "feature_conditioning":  # params fp32, activations `act` (autocast)
        H = H or D
        Dout = Dout or H
        Z = D + A
        unfused = {
            "fwd: pos_embed[target_pos] (fp32)": 2 * T * D * 4,
            "fwd: + mask_token (fp32)": 2 * T * D * 4,
            "fwd: cat with action (fp32)": T * D * 4 + T * Z * 4,
            "fwd: autocast cast of z": T * Z * (4 + act) if act != 4 else 0,
            "fwd: fc1 matmul": T * Z * act + T * H * act,
            "fwd: gelu, fc2, gelu": 6 * T * H * act,
            "fwd: fc3 matmul": T * H * act + T * Dout * act,
            "bwd: fc3 (dX, dW, db)": 3 * T * Dout * act + 2 * T * H * act,
            "bwd: gelu backward x2": 6 * T * H * act,
            "bwd: fc2 (dX, dW, db)": 5 * T * H * act,
            "bwd: fc1 (dX, dW, db)": 3 * T * H * act + 2 * T * Z * act,
            "bwd: cast of dz back to fp32": T * Z * (act + 4) if act != 4 else 0,
            "bwd: index_put_ into pos_embed grad (read src)": T * D * 4,
            "bwd: mask_token grad (sum over T)": T * D * 4,
        }
        fused = {
            "fwd: fused fc1 + gelu (write a1; P rows from L2)": T * H * act,
            "fwd: fc2, gelu": 4 * T * H * act,
            "fwd: fc3 matmul": T * H * act + T * Dout * act,
            "bwd: recompute gelu(h2)": 2 * T * H * act,
            "bwd: fc3 (dX, dW, db)": 3 * T * Dout * act + 2 * T * H * act,
            "bwd: gelu backward": 3 * T * H * act,
            "bwd: fc2 (dX, dW, db)": 5 * T * H * act,
            "bwd: fused fc1 backward (read g_a1, write a1; atomics in L2)": 2 * T * H * act,
        }
        return {"unfused": pack(unfused), "fused": pack(fused)}

    if op == "layer_norm_linear":  # x [T, D] -> LN -> linear -> y [T, Dout] (Dout = 3 D: QKV, 4 D: fc1)
        TD, TN = T * D, T * (Dout or 3 * D)
        common = {"bwd: g_xn = g_y W (read g_y, write g_xn)": (TN + TD) * act,
                  "bwd: layer_norm backward (read g_xn, x; write g_x)": 3 * TD * act}
        unfused = dict(common, **{
            "fwd: layer_norm (read x, write LN(x))": 2 * TD * act,
            "fwd: linear (read LN(x), write y)": (TD + TN) * act,
            "bwd: g_W = g_y^T LN(x) (read g_y, LN(x))": (TN + TD) * act,
            "bwd: g_b = sum g_y (read g_y)": TN * act,
        })
        fused = dict(common, **{
            "fwd: read x (statistics + prologue; re-reads from L2), write y": (TD + TN) * act,
            "bwd: g_W + g_b (read g_y, x; LN(x) recomputed)": (TN + TD) * act,
        })
        return {"unfused": pack(unfused), "fused": pack(fused)}

    if op == "ema_update":  # P params, fp32 target, online `online` bytes
        P = params
        up = 0 if online == 4 else 1
        loop = {"t.mul_(m)": 8 * P, "o.float()": up * P * (online + 4), "t.add_(o, 1 - m)": 12 * P}
        foreach = {"o.to(fp32)": up * P * (online + 4), "_foreach_lerp_": 12 * P}
        fused = {"one pass: read t, read o, write t": (8 + online) * P}
        return {"loop (reference)": pack(loop), "foreach": pack(foreach), "fused": pack(fused)}

    raise ValueError(op)


def bytes_table_vith14(act: int = 2) -> Dict[str, Dict]:
    r = RECIPES["ViT-H/14"]
    B, N = r["batch"], r["patches"]
    n_tgt, n_ctx = recipe_counts("ViT-H/14", B)
    T_tgt, T_ctx = sum(n_tgt), sum(n_ctx)
    n_params = sum(math.prod(s) for s in encoder_param_shapes("ViT-H/14"))
    return {
        "shapes": dict(B=B, N=N, enc_width=r["enc_width"], pred_width=r["pred_width"], T_target=T_tgt,
                       T_context=T_ctx, encoder_params=n_params, activation_bytes=act),
        "gather_tokens (context, enc width)": bytes_moved("gather_tokens", B=B, N=N, D=r["enc_width"],
                                                          T=T_ctx, act=act),
        "masked_l2_loss (targets, enc width)": bytes_moved("masked_l2_loss", B=B, N=N, D=r["enc_width"],
                                                           T=T_tgt, act=act),
        "feature_conditioning (pred width)": bytes_moved("feature_conditioning", B=B, N=N, D=r["pred_width"],
                                                         T=T_tgt, A=r["action_dim"], act=act),
        "layer_norm_linear (enc QKV, one block)": bytes_moved("layer_norm_linear", B=B, N=N, D=r["enc_width"],
                                                              T=T_ctx, act=act),
        "layer_norm_linear (enc fc1, one block)": bytes_moved("layer_norm_linear", B=B, N=N, D=r["enc_width"],
                                                              T=T_ctx, Dout=4 * r["enc_width"], act=act),
        "layer_norm_linear (pred QKV, one block)": bytes_moved("layer_norm_linear", B=B, N=N, D=r["pred_width"],
                                                               T=T_ctx + T_tgt, act=act),
        "layer_norm_linear (pred fc1, one block)": bytes_moved("layer_norm_linear", B=B, N=N, D=r["pred_width"],
                                                               T=T_ctx + T_tgt, Dout=4 * r["pred_width"], act=act),
        "ema_update (online fp32)": bytes_moved("ema_update", B=B, N=N, D=0, T=0, params=n_params, online=4),
        "ema_update (online bf16)": bytes_moved("ema_update", B=B, N=N, D=0, T=0, params=n_params, online=2),
    }


def print_bytes_table(tab: Dict[str, Dict]) -> None:
    s = tab["shapes"]
    print(f"\nAnalytic bytes moved per training step (fwd + bwd; EMA: one update), ViT-H/14 shapes: "
          f"B={s['B']}, N={s['N']}, T_target={s['T_target']}, T_context={s['T_context']}, "
          f"encoder {s['encoder_params'] / 1e6:.0f}M params, activations {s['activation_bytes']} B/elem "
          f"(bf16 autocast), EMA target fp32")
    print(f"{'op':40s} {'impl':18s} {'MB':>10s} {'vs fused':>9s}")
    for op, impls in tab.items():
        if op == "shapes":
            continue
        fused = impls["fused"]["total"]
        for impl, v in impls.items():
            print(f"{op:40s} {impl:18s} {v['total'] / 1e6:10.1f} {v['total'] / fused:8.2f}x")


# ----------------------------------------------------------------------------------------------------
# The device's bandwidth (timing and peak memory: benchmarks/common.py)
# ----------------------------------------------------------------------------------------------------
def device_peak_gbps(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    for key, gbps in _PEAK_GBPS.items():
        if key in props.name:
            return gbps
    return None


# ----------------------------------------------------------------------------------------------------
# Cases: for each op, a step closure per implementation
# ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    recipe: str
    shape: str
    impls: Dict[str, Callable[[], None]]
    bytes: Dict[str, int] = field(default_factory=dict)


def _pack_idx(counts: List[int], N: int, device, gen) -> torch.Tensor:
    return torch.cat([b * N + torch.randperm(N, generator=gen)[:k] for b, k in enumerate(counts)]).to(device)


def build_cases(recipe: str, batch: int, device: torch.device, ema_depth: Optional[int] = None,
                ops: Optional[List[str]] = None) -> List[Case]:
    r = RECIPES[recipe]
    N, De, Dp, A = r["patches"], r["enc_width"], r["pred_width"], r["action_dim"]
    cuda = device.type == "cuda"
    act_dtype = torch.bfloat16 if cuda else torch.float32
    act = 2 if cuda else 4
    gen = torch.Generator().manual_seed(0)
    n_tgt, n_ctx = recipe_counts(recipe, batch)
    T_tgt, T_ctx = sum(n_tgt), sum(n_ctx)
    ops = ops or ["gather_tokens", "masked_l2_loss", "feature_conditioning", "layer_norm_linear", "ema_update"]
    cases = []

    def grad_step(forward, inputs):
        def step():
            out = forward()
            grads = [x for x in inputs if x.requires_grad]
            g = torch.ones_like(out) if out.dim() == 0 else torch.full_like(out, 1e-3)
            torch.autograd.grad(out, grads, g)
        return step

    if "gather_tokens" in ops:
        x = torch.randn(batch, N, De, generator=gen).to(device, act_dtype).requires_grad_()
        ctx_idx = _pack_idx(n_ctx, N, device, gen)
        impls = {"unfused": grad_step(lambda: gather_tokens_reference(x, ctx_idx), [x])}
        if cuda:
            impls["fused"] = grad_step(lambda: GatherTokensFunction.apply(x, ctx_idx), [x])
        b = bytes_moved("gather_tokens", B=batch, N=N, D=De, T=T_ctx, act=act)
        cases.append(Case("gather_tokens", recipe, f"x[{batch},{N},{De}] -> [{T_ctx},{De}]", impls,
                          {k: v["total"] for k, v in b.items()}))

    if "masked_l2_loss" in ops:
        target_feats = torch.randn(batch, N, De, generator=gen).to(device, act_dtype)
        tgt_idx = _pack_idx(n_tgt, N, device, gen)
        pred = torch.randn(T_tgt, De, generator=gen).to(device, act_dtype).requires_grad_()
        impls = {"unfused": grad_step(lambda: masked_l2_loss_reference(pred, target_feats, tgt_idx), [pred])}
        if cuda:
            impls["fused"] = grad_step(lambda: MaskedL2LossFunction.apply(pred, target_feats, tgt_idx, 1e-6),
                                       [pred])
        b = bytes_moved("masked_l2_loss", B=batch, N=N, D=De, T=T_tgt, act=act)
        cases.append(Case("masked_l2_loss", recipe, f"pred[{T_tgt},{De}] target[{batch},{N},{De}]", impls,
                          {k: v["total"] for k, v in b.items()}))

    if "feature_conditioning" in ops:
        def p(*shape, s=0.02):
            return (torch.randn(*shape, generator=gen) * s).to(device).requires_grad_()
        mt, pe, ac = p(Dp), p(N, Dp, s=1.0), p(batch, A, s=1.0)
        w1, b1, w2, b2, w3, b3 = p(Dp, Dp + A), p(Dp), p(Dp, Dp), p(Dp), p(Dp, Dp), p(Dp)
        pos = torch.cat([torch.randperm(N, generator=gen)[:k] for k in n_tgt]).to(device)
        bat = torch.cat([torch.full((k,), i) for i, k in enumerate(n_tgt)]).to(device)
        args = (mt, pe, pos, ac, bat, w1, b1, w2, b2, w3, b3)
        leaves = [mt, pe, ac, w1, b1, w2, b2, w3, b3]
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

        def under_autocast(f):
            def g():
                with autocast():
                    return f()
            return g
        impls = {"unfused": grad_step(under_autocast(lambda: feature_conditioning_reference(*args)), leaves)}
        if cuda:
            impls["fused"] = grad_step(under_autocast(lambda: FeatureConditioningFunction.apply(*args)), leaves)
        b = bytes_moved("feature_conditioning", B=batch, N=N, D=Dp, T=T_tgt, A=A, act=act)
        cases.append(Case("feature_conditioning", recipe, f"T={T_tgt} N={N} D=H={Dp} A={A}", impls,
                          {k: v["total"] for k, v in b.items()}))

    if "layer_norm_linear" in ops:  # the predictor's LN -> QKV over its packed context + target tokens
        T = T_ctx + T_tgt
        xs = torch.randn(T, Dp, generator=gen).to(device, act_dtype).requires_grad_()
        ln_w, ln_b = (torch.randn(Dp, generator=gen).to(device).requires_grad_() for _ in range(2))
        proj_w = (torch.randn(3 * Dp, Dp, generator=gen) * Dp ** -0.5).to(device).requires_grad_()
        proj_b = torch.zeros(3 * Dp, device=device, requires_grad=True)
        ln_leaves = [xs, ln_w, ln_b, proj_w, proj_b]
        ln_autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

        def ln_step(f):
            def g():
                with ln_autocast():
                    return f(xs, ln_w, ln_b, 1e-6, proj_w, proj_b)
            return grad_step(g, ln_leaves)
        impls = {"unfused": ln_step(layer_norm_linear_reference)}
        if cuda:
            impls["fused"] = ln_step(LayerNormLinearFunction.apply)
        nb = bytes_moved("layer_norm_linear", B=batch, N=N, D=Dp, T=T, act=act)
        cases.append(Case("layer_norm_linear", recipe, f"x[{T},{Dp}] -> LN -> [{T},{3 * Dp}]", impls,
                          {k: v["total"] for k, v in nb.items()}))

    if "ema_update" in ops:
        depth = ema_depth if ema_depth is not None else r["depth"]
        shapes = encoder_param_shapes(recipe, depth=ema_depth)
        n_params = sum(math.prod(s) for s in shapes)
        t_params = [torch.randn(s, generator=gen).to(device) for s in shapes]
        o_params = [torch.randn(s, generator=gen).to(device) for s in shapes]
        fb = FlatBuffer([torch.nn.Parameter(t.clone(), requires_grad=False) for t in t_params])
        # foreach: the multi-tensor baseline a flat buffer is measured against (torch._foreach_lerp_)
        impls = {"loop (reference)": lambda: ema_update_reference(t_params, o_params, 0.996),
                 "foreach": lambda: torch._foreach_lerp_(t_params, o_params, 1.0 - 0.996)}
        if cuda:
            impls["fused"] = lambda: ema_update_flat_(fb.flat, o_params, 0.996)
        b = bytes_moved("ema_update", B=0, N=0, D=0, T=0, params=n_params, online=4)
        cases.append(Case("ema_update", recipe, f"{len(shapes)} tensors, {n_params / 1e6:.1f}M params "
                          f"({depth} blocks), online fp32", impls, {k: v["total"] for k, v in b.items()}))
    return cases


def run(quick: bool, out: Optional[str], device: torch.device, ops: Optional[List[str]] = None) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        dispatch.set_backend("triton")
        batch_of = {name: r["batch"] for name, r in RECIPES.items()}
        ema_depth = {name: None for name in RECIPES}
        reps, warmup = (10, 3) if quick else (50, 10)
    else:
        dispatch.set_backend("reference")
        cpu_batch = 8 if quick else 32
        batch_of = {name: cpu_batch for name in RECIPES}
        ema_depth = {name: (2 if quick else 6) for name in RECIPES}
        reps, warmup = (7, 2) if quick else (20, 3)
    peak = device_peak_gbps(device)
    print(f"device: {torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'} "
          f"({device.type}), torch {torch.__version__}, threads {torch.get_num_threads()}"
          + (f", peak HBM {peak:.0f} GB/s" if peak else ""))
    if not cuda:
        print(f"NOTE: CPU run. The Triton kernels are not timed (they run on CPU only under the interpreter, "
              f"which is for correctness). Rows are the reference (unfused) paths and the EMA's loop vs "
              f"foreach fast path, at REDUCED batch {batch_of['ViT-B/16']} (recipes use 128/GPU) and an "
              f"EMA over {ema_depth['ViT-B/16']} blocks (not the full encoder). fp32 everywhere.")
    rows = []
    hdr = f"{'op':22s} {'recipe':9s} {'impl':17s} {'ms':>9s} {'peak MiB':>9s} {'model MB':>9s} {'GB/s':>8s} " \
          f"{'%peak':>6s} {'speedup':>8s}  shape"
    print(hdr)
    print("-" * len(hdr))
    for recipe in RECIPES:
        for case in build_cases(recipe, batch_of[recipe], device, ema_depth[recipe], ops):
            base_ms = None
            for impl, fn in case.impls.items():
                ms = time_fn(fn, device, reps, warmup)
                mem = allocated_peak(fn, device)
                nbytes = case.bytes.get(impl)
                gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
                if base_ms is None:
                    base_ms = ms
                row = dict(op=case.op, recipe=recipe, impl=impl, shape=case.shape, ms=ms, peak_mib=mem / 2**20,
                           model_bytes=nbytes, gbps=gbps if cuda else None,
                           pct_peak=(100 * gbps / peak) if (cuda and peak and gbps) else None,
                           speedup=base_ms / ms)
                rows.append(row)
                fmt = lambda v, f: ("-" if v is None else format(v, f))  # noqa: E731
                print(f"{case.op:22s} {recipe:9s} {impl:17s} {ms:9.3f} {mem / 2**20:9.1f} "
                      f"{fmt(nbytes and nbytes / 1e6, '9.1f'):>9s} {fmt(row['gbps'], '8.1f'):>8s} "
                      f"{fmt(row['pct_peak'], '6.1f'):>6s} {row['speedup']:7.2f}x  {case.shape}")
    dispatch.set_backend(None)
    tab = bytes_table_vith14()
    print_bytes_table(tab)
    result = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
                  torch=torch.__version__, quick=quick, threads=torch.get_num_threads(), peak_gbps=peak,
                  reduced_batch_on_cpu=None if cuda else batch_of["ViT-B/16"],
                  ema_blocks_on_cpu=None if cuda else ema_depth["ViT-B/16"], rows=rows,
                  bytes_moved_vith14=tab)
    save_json(result, out)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows and the bytes estimate as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; on CPU a small batch (< 1 min)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--ops", default=None, help="comma-separated subset of ops")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; it does not matter here (CPU rows use the reference paths)")
    run(args.quick, args.out, device, args.ops.split(",") if args.ops else None)


if __name__ == "__main__":
    main()
