"""The first thing to run on a GPU machine: one command, every figure the engine's GPU speed rests on.

    make gpu-check                 # = python -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check [--dry] [--steps 30] [--recipes vitb,vith] [--out PATH]

On one H100 / H200 it takes a few minutes (the budget is 8) and writes one JSON and prints one table of:

1. **the machine**: device, driver, CUDA, torch / triton / xformers versions, whether xformers' CUDA kernels
   run beside the pinned torch, and which attention the engine then uses (``train.attention=auto``);
2. **every Triton kernel against its reference** (the ops of ``kernels.aot.op_modules()``, each op's
   ``check_cases``: a new kernel joins by being registered there) in fp32 and bf16 at the shapes of the
   ViT-B/16 and ViT-H/14 recipes: max error of the outputs and of the gradients (relative to the
   reference's largest magnitude), the fused and the reference time, and for the memory-bound ops the
   achieved GB/s (the analytic bytes of ``benchmarks/kernels_table.py``'s ``bytes_moved``) against the
   device's bandwidth;
3. **30 timed pretraining steps** of ViT-B/16 and ViT-H/14 at 224 px, bf16 autocast, one rank at the
   recipe's ZeRO stage and batch per GPU (``optim.global_batch`` off: no accumulation), per backend pair
   (Triton + xformers, reference + SDPA; and for ViT-B/16 Triton + xformers with ``train.compile=true``,
   whose warm-up compiles: the measurement ``train.compile``'s default follows): img/s, MFU against the
   datasheet bf16 peak
   (``engine.flops.PEAK_BF16``) and peak allocated memory against ``engine.plan.memory_plan``'s prediction
   for that very configuration. Each pair runs in a process of its own (clean peak-memory statistics).

Without CUDA it runs a **dry mode** (also ``--dry``): the same code paths at tiny shapes, the Triton kernels
under the interpreter (fp32 only), the training steps on the CPU; it lists what it skipped and exits 0
unless something that ran failed. ``make test`` runs it (``tests/test_gpu_check.py``). Exit code 1: a
kernel off its reference beyond the tolerance (:data:`TOLERANCE`) or a step that failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import ROOT, cuda_peak, reset_cuda_peak, time_fn

# the sibling benchmarks are imported in the functions: kernels_table imports triton (through kernels/), which
# has to come after this
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels then run on CPU tensors

RECIPES = {"vitb": ("ViT-B/16", "recipes/pretrain_vitb_equi.py"), "vith": ("ViT-H/14", "recipes/pretrain_vith.py")}
PAIRS = (("triton", "xformers"), ("reference", "sdpa"))
#: max |fused - reference| / max |reference|, per output, that passes
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
DRY_SETS = ["model.encoder=custom", "model.embed_dim=64", "model.depth=2", "model.num_heads=4", "model.patch_size=8",
            "model.predictor_depth=2", "model.predictor_width=32", "model.predictor_heads=4", "data.img_size=32",
            "data.batch_size=4", "train.precision=fp32"]


# ----------------------------------------------------------------------------------------------------
# 1. the machine
# ----------------------------------------------------------------------------------------------------
def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # not installed or broken: say so in the table
        return f"not importable ({type(e).__name__})"


def machine() -> dict:
    from benchmarks import kernels_table as kt
    from engine.flops import PEAK_BF16
    from kernels import attention

    cuda = torch.cuda.is_available()
    out = dict(cuda=cuda, python=platform.python_version(), torch=torch.__version__, triton=version("triton"),
               xformers=version("xformers"), deepspeed=version("deepspeed"), cpu=platform.processor() or platform.machine())
    if not cuda:
        return dict(out, device="cpu (no CUDA)", driver=None, cuda_runtime=None, xformers_kernels_run=False,
                    attention_auto=attention.resolve_backend(torch.device("cpu"), "auto"), peak_gbps=None,
                    peak_bf16_tflops=None)
    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return dict(out, device=name, driver=driver_version(), cuda_runtime=torch.version.cuda,
                capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
                memory_gib=torch.cuda.get_device_properties(dev).total_memory / 2 ** 30,
                xformers_kernels_run=attention.xformers_usable(0),
                attention_auto=attention.resolve_backend(dev, "auto"), peak_gbps=kt.device_peak_gbps(dev),
                peak_bf16_tflops=peak and peak / 1e12)


# ----------------------------------------------------------------------------------------------------
# 2. every Triton kernel against its reference
# ----------------------------------------------------------------------------------------------------
def kernel_shapes(dry: bool) -> list:
    """The recipes' kernel shapes (``kernels.specs.Shapes``), or tiny ones for the interpreter."""
    from kernels.specs import Shapes

    if dry:
        return [Shapes("tiny", batch=3, patches=16, enc_width=48, pred_width=32, action_dim=12, target_tokens=20,
                       context_tokens=25, encoder_params=3000, encoder_tensors=7)]
    from benchmarks import compile_table

    return [compile_table.recipe_aot_shapes(RECIPES[k][0]) for k in RECIPES]


def run_case(case, backend: str) -> list:
    """[output, *gradients of the leaves under a fixed cotangent] through ``backend``."""
    from kernels import dispatch

    with dispatch.backend(backend):
        out = case.forward()
        if not case.leaves:
            return [out.detach().float()]
        g = getattr(case, "cotangent", None)  # made once per case: the timed runs reuse it
        if g is None:
            g = case.cotangent = torch.ones_like(out) if out.dim() == 0 else torch.randn(
                out.shape, generator=torch.Generator().manual_seed(7)).to(out)
        grads = torch.autograd.grad(out, case.leaves, g, allow_unused=True)
    return [out.detach().float()] + [x.float() if x is not None else None for x in grads]


def max_error(fused: list, ref: list) -> tuple:
    """(max abs error, max over outputs of abs error / the reference's max magnitude)."""
    worst_abs = worst_rel = 0.0
    for f, r in zip(fused, ref):
        if f is None or r is None:
            continue
        err = (f - r).abs().max().item() if f.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale else err)
    return worst_abs, worst_rel


def time_case(case, backend: str, device, reps: int) -> float:
    """Median ms of the case (forward + backward, or ``case.timed``) through ``backend``."""
    from kernels import dispatch

    def fn():
        with dispatch.backend(backend):
            if case.timed is not None:
                case.timed()
            else:
                run_case(case, backend)
    return time_fn(fn, device, reps=reps, warmup=max(1, reps // 5))


def case_row(case, recipe: str, dtype: str, device, peak_gbps) -> dict:
    from benchmarks import kernels_table as kt

    fused, ref = run_case(case, "triton"), run_case(case, "reference")
    abs_err, rel_err = max_error(fused, ref)
    row = dict(op=case.op, variant=case.variant, recipe=recipe, dtype=dtype, shape=case.shape, max_abs_error=abs_err,
               max_rel_error=rel_err, tolerance=TOLERANCE[dtype], ok=rel_err <= TOLERANCE[dtype])
    if device.type == "cuda":
        row["fused_ms"] = time_case(case, "triton", device, reps=20)
        row["reference_ms"] = time_case(case, "reference", device, reps=20)
        if case.bytes_args is not None:
            try:
                nbytes = kt.bytes_moved(case.op, **case.bytes_args)["fused"]["total"]
            except ValueError:  # an op the bytes model does not know yet
                nbytes = None
            row["model_bytes"] = nbytes
            row["gbps"] = nbytes and nbytes / (row["fused_ms"] * 1e-3) / 1e9
            row["pct_peak_bw"] = row["gbps"] and peak_gbps and 100 * row["gbps"] / peak_gbps
    return row


def kernel_rows(dry: bool, device, peak_gbps, skipped: list) -> list:
    from kernels import aot, dispatch

    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]
    if dry:
        skipped.append("kernels in bf16 (the Triton interpreter runs fp32 only)")
        skipped.append("kernel timings and GB/s (the interpreter is for correctness, not speed)")
        skipped.append("kernels at the ViT-B/16 and ViT-H/14 shapes (tiny shapes under the interpreter)")
    rows = []
    # under the interpreter, the kernels run with their interpreter tiles and again with the CUDA ones (the
    # column tiling and the cross-tile atomics a GPU runs)
    for tiles in (("interpreter", "cuda") if dry else (None,)):
        with dispatch.use_tiles(tiles):
            for shapes in kernel_shapes(dry):
                for module in aot.op_modules():
                    rows += module_rows(module, shapes, dtypes, device, peak_gbps, tiles)
    return rows


def module_rows(module, shapes, dtypes, device, peak_gbps, tiles) -> list:
    from kernels.specs import dtype_name

    recipe = shapes.recipe + (f" ({tiles} tiles)" if tiles else "")
    if not hasattr(module, "check_cases"):
        return [dict(op=module.__name__, recipe=recipe, ok=False,
                     error="registered in kernels.aot.op_modules() without check_cases(shapes, dtype, device)")]
    return [case_row(case, recipe, dtype_name(dtype), device, peak_gbps)
            for dtype in dtypes for case in module.check_cases(shapes, dtype, device)]


# ----------------------------------------------------------------------------------------------------
# 3. timed pretraining steps, one process per recipe x backend pair
# ----------------------------------------------------------------------------------------------------
def step_sets(kernels: str, attention: str, compiled: bool, dry: bool, out_dir: str) -> list:
    sets = [f"train.kernels={kernels}", f"train.attention={attention}", "optim.global_batch=None",
            f"train.out_dir={out_dir}", "train.progress=false"]
    if compiled:  # the dry mode traces with dynamo only (inductor's code generation takes minutes on a CPU)
        sets += ["train.compile=true"] + (["train.compile_backend=eager"] if dry else [])
    return sets + (DRY_SETS if dry else ["train.precision=bf16", "data.img_size=224"])


def predicted_bytes(cfg, attention: str) -> float:
    """``engine.plan.memory_plan`` for this configuration on one rank, without the CUDA context overhead
    (``torch.cuda.max_memory_allocated`` does not see it)."""
    from engine.plan import PRECISIONS, memory_plan, token_stats

    prec = "autocast" if cfg.train.precision == "bf16" else "fp32"
    tok = token_stats(cfg, cfg.data.batch_size)
    return memory_plan(cfg, cfg.train.zero_stage, 1, PRECISIONS[prec], cfg.train.activation_checkpointing, tok,
                       "packed" if attention == "xformers" else "padded", overhead_bytes=0.0).total


def step_child(recipe: str, kernels: str, attention: str, compiled: bool, steps: int, warmup: int, dry: bool) -> dict:
    from benchmarks import recipe_step as rs
    from engine.flops import device_peak_flops, step_flops

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = rs.load_config(RECIPES[recipe][1], step_sets(kernels, attention, compiled, dry, out_dir))
        warmup = warmup + 2 if compiled else warmup  # step 0 compiles, step 1 recompiles with dynamic shapes
        built = rs.build(cfg)
        device = built.run.device
        images = rs.random_images(cfg, n=2)
        for i in range(warmup):
            rs.step(built, images, i)
        built.meters.reset()
        cuda = device.type == "cuda"
        if cuda:
            reset_cuda_peak()
        t0 = time.perf_counter()
        for i in range(steps):
            rs.step(built, images, warmup + i)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / steps
        tok = rs.tokens_per_image(built)
        B = cfg.data.batch_size
        flops = step_flops(cfg, tok["context"], tok["target"], B)
        peak = device_peak_flops(device)
        return dict(recipe=RECIPES[recipe][0], kernels=kernels, attention=attention, compile=compiled and
                    cfg.train.compile_backend, batch=B, img=cfg.data.img_size,
                    zero_stage=cfg.train.zero_stage, precision=cfg.train.precision, steps=steps, s_per_step=seconds,
                    img_per_s=B / seconds, tflops_per_s=flops / seconds / 1e12, mfu=peak and flops / seconds / peak,
                    context_tokens=tok["context"], target_tokens=tok["target"],
                    loss=built.meters.loss_sum.item() / built.meters.micro,
                    peak_allocated_gib=cuda_peak() / 2 ** 30 if cuda else None,
                    peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
                    plan_gib=predicted_bytes(cfg, attention) / 2 ** 30)


def run_step_child(recipe: str, kernels: str, attention: str, compiled: bool, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", recipe, kernels, attention,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += (["--dry"] if args.dry else []) + (["--compiled"] if compiled else [])
    from benchmarks import recipe_step as rs
    from engine.distributed import free_port

    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MASTER_PORT=str(port))
    timeout = args.child_timeout * (2 if compiled else 1)  # the compiled row's warm-up compiles every block
    try:
        proc = rs.run_group(cmd, env, timeout, port)
    except subprocess.TimeoutExpired:
        return dict(recipe=RECIPES[recipe][0], kernels=kernels, attention=attention, compile=compiled, ok=False,
                    error=f"timed out after {timeout} s")
    for line in proc.stdout.splitlines():
        if line.startswith("GPU_CHECK_STEP "):
            return dict(json.loads(line[len("GPU_CHECK_STEP "):]), ok=True)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(recipe=RECIPES[recipe][0], kernels=kernels, attention=attention, compile=compiled, ok=False,
                error=f"exit {proc.returncode}: " + " | ".join(tail))


def step_rows(args, env: dict, skipped: list) -> list:
    rows = []
    for recipe in args.recipes:
        # the backend pairs, then (the first recipe only: the compile takes minutes) Triton + xformers compiled
        todo = [(k, a, False) for k, a in PAIRS] + ([(*PAIRS[0], True)] if recipe == args.recipes[0] else [])
        for kernels, attention, compiled in todo:
            if attention == "xformers" and not env["xformers_kernels_run"]:
                skipped.append(f"{RECIPES[recipe][0]} steps with {kernels} + xformers{' compiled' * compiled} "
                               f"(xformers' kernels do not run here{'' if env['cuda'] else ': no CUDA'}); ran "
                               f"{kernels} + sdpa instead")
                attention = "sdpa"
            rows.append(run_step_child(recipe, kernels, attention, compiled, args))
            print(f"  steps: {rows[-1]['recipe']} {kernels} + {attention}{' compiled' * compiled}: "
                  f"{'%.1f img/s' % rows[-1]['img_per_s'] if rows[-1]['ok'] else rows[-1]['error']}", flush=True)
    if args.dry:
        skipped.append("steps at 224 px with the recipes' networks in bf16 (one tiny network at 32 px, fp32, on the "
                       "CPU, in place of both recipes)")
        skipped.append("MFU and peak GPU memory (no CUDA device)")
        skipped.append("inductor's code generation for train.compile (the dry mode traces with the eager backend)")
    return rows


# ----------------------------------------------------------------------------------------------------
# the table, the JSON, the command line
# ----------------------------------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(result: dict) -> None:
    env = result["machine"]
    print(f"\n== machine\ndevice {env['device']} | driver {env['driver']} | CUDA {env['cuda_runtime']} | "
          f"torch {env['torch']} | triton {env['triton']} | xformers {env['xformers']} | deepspeed {env['deepspeed']}")
    print(f"xformers kernels run: {'yes' if env['xformers_kernels_run'] else 'no'}; engine attention (auto): "
          f"{env['attention_auto']}; peak HBM {fmt(env['peak_gbps'], '.0f')} GB/s; bf16 peak "
          f"{fmt(env['peak_bf16_tflops'], '.0f')} TFLOP/s")
    print(f"\n== kernels against their reference (max error relative to the reference's max magnitude)")
    print(f"{'op':22s} {'variant':12s} {'recipe':24s} {'dtype':5s} {'rel err':>9s} {'ok':>3s} {'fused ms':>9s} "
          f"{'ref ms':>9s} {'GB/s':>7s} {'%bw':>5s}  shape")
    for r in result["kernels"]:
        if "error" in r:
            print(f"{r['op']:22s} {'':12s} {r['recipe']:24s} FAILED: {r['error']}")
            continue
        print(f"{r['op']:22s} {r['variant']:12s} {r['recipe']:24s} {r['dtype']:5s} {r['max_rel_error']:9.2e} "
              f"{'yes' if r['ok'] else 'NO':>3s} {fmt(r.get('fused_ms'), '9.3f'):>9s} {fmt(r.get('reference_ms'), '9.3f'):>9s} "
              f"{fmt(r.get('gbps'), '7.0f'):>7s} {fmt(r.get('pct_peak_bw'), '5.1f'):>5s}  {r['shape']}")
    print(f"\n== pretraining steps ({result['steps']} timed after {result['warmup']} warm-up, one rank)")
    print(f"{'recipe':9s} {'backends':28s} {'batch':>5s} {'s/step':>7s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak GiB':>8s} {'plan GiB':>8s} {'plan/meas':>9s}")
    for r in result["steps_rows"]:
        pair = f"{r['kernels']} + {r['attention']}" + (" +compile" if r.get("compile") else "")
        if not r["ok"]:
            print(f"{r['recipe']:9s} {pair:28s} FAILED: {r['error']}")
            continue
        meas = r["peak_allocated_gib"]
        print(f"{r['recipe']:9s} {pair:28s} {r['batch']:5d} {r['s_per_step']:7.3f} {r['img_per_s']:8.1f} "
              f"{r['tflops_per_s']:8.2f} {fmt(r['mfu'], '6.3f'):>6s} {fmt(meas, '8.2f'):>8s} {r['plan_gib']:8.2f} "
              f"{fmt(meas and r['plan_gib'] / meas, '9.3f'):>9s}")
    print(f"\n== skipped ({len(result['skipped'])})" + "".join(f"\n  - {s}" for s in result["skipped"]))
    print(f"\n{'PASS' if result['ok'] else 'FAIL'} in {result['seconds']:.0f} s ({result['mode']} mode)")


def check(args) -> int:
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.dry
    args.dry = not cuda
    skipped = [] if cuda else ["everything on a GPU: no CUDA device here (dry mode)"]
    env = machine()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"gpu-check ({'full' if cuda else 'dry'} mode) on {env['device']}", flush=True)
    kernels = kernel_rows(args.dry, device, env["peak_gbps"], skipped)
    print(f"  kernels: {sum(r['ok'] for r in kernels)} of {len(kernels)} within tolerance", flush=True)
    steps = step_rows(args, env, skipped)
    result = dict(mode="full" if cuda else "dry", machine=env, tolerance=TOLERANCE, kernels=kernels, steps=args.steps,
                  warmup=args.warmup, steps_rows=steps, skipped=skipped,
                  ok=all(r["ok"] for r in kernels) and all(r["ok"] for r in steps), seconds=time.time() - t0)
    print_report(result)
    if args.out:
        from engine.checkpoint import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="the dry mode even where CUDA is present")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per backend pair (30; dry 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; dry 1)")
    ap.add_argument("--recipes", default=None, help=f"comma-separated: {', '.join(RECIPES)} (default both; dry: vitb)")
    ap.add_argument("--child-timeout", type=int, default=None, help="seconds per backend pair's process (240; dry 600)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--child", nargs=3, metavar=("RECIPE", "KERNELS", "ATTENTION"), help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    args.steps = args.steps or (2 if dry else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    args.child_timeout = args.child_timeout or (600 if dry else 240)
    # the dry mode's networks are tiny whatever the recipe: one recipe runs its steps
    args.recipes = [r for r in (args.recipes or ("vitb" if dry else "vitb,vith")).split(",") if r]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        print(f"error: --recipes {','.join(unknown)}: use {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    if args.child:
        print("GPU_CHECK_STEP " + json.dumps(step_child(*args.child, args.compiled, args.steps, args.warmup, dry)))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
