"""Optimizer steps of each pretraining recipe at its real size on the CPU, and engine.plan beside them.

    python -m benchmarks.full_size [--recipes vitb_inv,vitb_equi,vitl_equi,vith] [--out benchmarks/results/full_size.json]

Each recipe runs its real networks at 224 px (the recipe's encoder, patch size and predictor) for two optimizer
steps of what ``engine.pretrain.pretrain`` runs (``benchmarks/recipe_step.py``: views + action, masks, EMA target
encoder, encoder + predictor, loss, DeepSpeed backward, AdamW, EMA update) in fp32 with the CPU's backends
(reference kernels, padded SDPA), under the ``deepspeed`` launcher on :data:`LAUNCHES`' ranks and ZeRO stage (two
CPU ranks at ZeRO-3 for the ViT-B/16 recipes; one rank for ViT-L/16 and ViT-H/14: two ranks of ViT-L/16 at ZeRO-3
hold about 8 GiB each while the engine is built, more than a machine shared by other jobs can give), batch 1 or
2 per rank, no accumulation. Each rank reports a step's peak resident memory: its high-water mark during the step (reset
before each step: ``benchmarks.common.reset_peak_rss`` / ``peak_rss``) minus its resident size after the imports,
with glibc returning freed blocks (``MALLOC_MMAP_THRESHOLD_=65536``, ``IWM_MALLOC=default``), as
``benchmarks/plan_validation.py`` measures; the larger of the ranks, per step. Beside each step:
``engine.plan.memory_plan`` for that very configuration (stage, ranks, batch, fp32, padded attention,
``resident=True``: the pages a CPU rank on gloo holds, and ``CPU_OVERHEAD_GIB`` in place of the CUDA overhead):
its ``first_step_total`` for the first step (AdamW's moments are allocated in it, ZeRO-3 records its trace), its
``total`` for the second (the steady state). Before each launch the script checks that MemAvailable holds 1.1x
the plan for all ranks, and skips the launch (saying so) when it does not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import recipe_step as rs
from benchmarks.common import ROOT, current_rss, peak_rss, reset_peak_rss

GiB = 2 ** 30
#: name -> (recipe file, ranks, ZeRO stage, batch per rank)
LAUNCHES = {
    "vitb_inv": ("recipes/pretrain_vitb_inv.py", 2, 3, 2),
    "vitb_equi": ("recipes/pretrain_vitb_equi.py", 2, 3, 2),
    "vitl_equi": ("recipes/pretrain_vitl_equi.py", 1, 0, 1),
    "vith": ("recipes/pretrain_vith.py", 1, 0, 1),
}
TOLERANCE = 0.15


def sets(name: str, out_dir: str) -> list:
    _, _, stage, batch = LAUNCHES[name]
    return ["data.img_size=224", f"data.batch_size={batch}", "optim.global_batch=None", f"train.zero_stage={stage}",
            "train.precision=fp32", "train.kernels=reference", "train.attention=sdpa", f"train.out_dir={out_dir}",
            "train.progress=false"]


def plan_bytes(name: str) -> dict:
    """engine.plan's per-rank peak for the launch, and its parts (GiB)."""
    from engine.plan import CPU_OVERHEAD_GIB, PRECISIONS, memory_plan, token_stats

    recipe, ranks, stage, batch = LAUNCHES[name]
    cfg = rs.load_config(recipe, sets(name, "unused"))
    mem = memory_plan(cfg, stage, ranks, PRECISIONS["fp32"], False, token_stats(cfg, batch), "padded",
                      overhead_bytes=CPU_OVERHEAD_GIB * GiB, resident=True)
    return dict(total=mem.total, peak_phase=mem.peak_phase, steps=[mem.first_step_total, mem.total],
                step_phases=[mem.first_step_phase, mem.peak_phase],
                parts_gib={k: round(v, 3) for k, v in mem.gib().items()})


def rank_main(name: str, tmp: str, steps: int = 2) -> None:
    """One rank of the launch: build, then per optimizer step reset the high-water mark, step, read it; report."""
    import torch

    torch.set_num_threads(1)
    baseline = current_rss()  # after torch, DeepSpeed and the engine are imported
    cfg = rs.load_config(LAUNCHES[name][0], sets(name, tmp))
    t0 = time.perf_counter()
    built = rs.build(cfg)
    built_s = time.perf_counter() - t0
    images = rs.random_images(cfg, n=1)
    after_build = current_rss()
    phases = watch_phases(built, baseline)
    peaks, times = [], []
    for i in range(steps):  # the first step allocates what the optimizer keeps; the second is the steady state
        if not reset_peak_rss():  # VmHWM restarts from the current resident size
            raise RuntimeError("full_size needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
        t0 = time.perf_counter()
        rs.step(built, images, i)
        times.append(time.perf_counter() - t0)
        peaks.append(peak_rss())
        phases.append(("end of step", i))
    loss = built.meters.loss_sum.item() / built.meters.micro
    print("FULL_SIZE " + json.dumps(dict(rank=built.run.info.rank, baseline=baseline, after_build=after_build,
                                         peaks=peaks, step_peak=max(peaks) - baseline, build_s=built_s,
                                         step_s=times, loss=loss, phases_gib=phases)), flush=True)


def watch_phases(built, baseline: int) -> list:
    """Record (phase, resident GiB above the baseline at its end, high-water GiB so far) around the step's parts:
    the target encoder's forward, the trained networks' forward, the backward and the optimizer step."""
    out = []

    def wrap(obj, attr, name):
        fn = getattr(obj, attr)

        def wrapped(*a, **k):
            result = fn(*a, **k)
            out.append((name, round((current_rss() - baseline) / GiB, 3), round((peak_rss() - baseline) / GiB, 3)))
            return result
        setattr(obj, attr, wrapped)

    wrap(built.task.target_encoder.module, "forward", "target forward")
    wrap(built.engine.module, "forward", "forward")
    wrap(built.engine, "backward", "backward")
    wrap(built.engine, "step", "optimizer step")
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def launch(name: str, timeout: int) -> dict:
    recipe, ranks, stage, batch = LAUNCHES[name]
    plan = plan_bytes(name)
    row = dict(name=name, recipe=recipe, ranks=ranks, zero_stage=stage, batch_per_rank=batch, img=224,
               plan_gib=plan["total"] / GiB, plan_peak_phase=plan["peak_phase"], plan_parts_gib=plan["parts_gib"])
    need, free = 1.1 * plan["total"] * ranks, mem_available()
    if free < need:
        return dict(row, ok=False, error=f"skipped: {free / GiB:.1f} GiB available, {need / GiB:.1f} GiB needed")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", IWM_MALLOC="default", MALLOC_MMAP_THRESHOLD_="65536",
               TRITON_INTERPRET="0")
    port = str(29500 + os.getpid() % 200)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", port, "--module", "benchmarks.full_size", "--child", name]
    t0 = time.time()
    try:
        proc = rs.run_group(cmd, env, timeout, port)
    except subprocess.TimeoutExpired:
        return dict(row, ok=False, error=f"timed out after {timeout} s (every rank stopped)")
    ranks_out = sorted((json.loads(line.split("FULL_SIZE ", 1)[1]) for line in proc.stdout.splitlines()
                        if "FULL_SIZE " in line), key=lambda r: r["rank"])
    if proc.returncode != 0 or len(ranks_out) != ranks:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        return dict(row, ok=False, error=f"exit {proc.returncode}: {tail}")
    measured = max(r["step_peak"] for r in ranks_out)
    per_step = [max(r["peaks"][i] - r["baseline"] for r in ranks_out) for i in range(len(plan["steps"]))]
    ratios = [want / got for want, got in zip(plan["steps"], per_step)]
    return dict(row, ok=True, seconds=time.time() - t0, ranks_measured=ranks_out, measured_gib=measured / GiB,
                plan_over_measured=plan["total"] / measured, step_measured_gib=[m / GiB for m in per_step],
                step_plan_gib=[b / GiB for b in plan["steps"]], step_plan_phase=plan["step_phases"],
                step_plan_over_measured=ratios, within_tolerance=all(abs(x - 1) <= TOLERANCE for x in ratios))


def print_table(rows: list) -> None:
    print(f"\n{'recipe':<10} {'ranks':>5} {'ZeRO':>4} {'batch':>5} {'step':>4} {'measured GiB/rank':>18} "
          f"{'plan GiB':>8} {'plan/meas':>9} {'step s':>7}  plan's peak phase")
    for r in rows:
        head = f"{r['name']:<10} {r['ranks']:>5} {r['zero_stage']:>4} {r['batch_per_rank']:>5}"
        if not r["ok"]:
            print(f"{head} {r['error']}")
            continue
        for i, (plan, ratio, phase) in enumerate(zip(r["step_plan_gib"], r["step_plan_over_measured"],
                                                     r["step_plan_phase"])):
            per_rank = " / ".join(f"{(x['peaks'][i] - x['baseline']) / GiB:.2f}" for x in r["ranks_measured"])
            step_s = max(x["step_s"][i] for x in r["ranks_measured"])
            print(f"{head} {i + 1:>4} {per_rank:>18} {plan:8.2f} {ratio:9.3f} {step_s:7.1f}  {phase}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(LAUNCHES), help=f"comma-separated: {', '.join(LAUNCHES)}")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "full_size.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    if args.child:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rank_main(args.child, tmp)
        return 0
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in LAUNCHES]
    if unknown:
        print(f"error: --recipes {','.join(unknown)}: use {', '.join(LAUNCHES)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        rows.append(launch(name, args.timeout))
        r = rows[-1]
        print(f"{name}: " + (f"measured {r['measured_gib']:.2f} GiB/rank, plan {r['plan_gib']:.2f}" if r["ok"]
                             else r["error"]), flush=True)
    print_table(rows)
    if args.out:
        from engine.checkpoint import atomic_write_json

        atomic_write_json(args.out, dict(benchmark="full_size", tolerance=TOLERANCE, rows=rows))
        print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
