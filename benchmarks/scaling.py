"""Scaling study: encoder size x ranks x ZeRO stage, on the real pretraining path under the `deepspeed` launcher.

    python -m benchmarks.scaling                       # CPU: ti, s, b x 1, 2 ranks x ZeRO 0-3 (< ~10 min, 2 cores)
    python -m benchmarks.scaling --quick               # smoke: ti x 1, 2 ranks x ZeRO 1 (about a minute)
    python -m benchmarks.scaling --sizes ti s b l h --ranks 1 2 4 8 --stages 1 2 3     # one GPU node
    python -m benchmarks.scaling --nodes 1 2 --ranks 8 --hostfile hosts --master-addr node1  # across nodes

Every point is one run of ``deepspeed --num_gpus R [--hostfile H --num_nodes K] --module benchmarks.scaling
--child ...``: each rank runs what ``engine.pretrain.pretrain`` runs (``engine.run.Run`` fitting
``engine.pretrain.Pretraining``: the loader, views, masks, DeepSpeed engine, EMA, logs), with the MRR
evaluation and the checkpoint of the last step replaced by a measurement, so a point writes nothing but its
logs. Settings: the config defaults (views, masks, ``feature`` conditioning, AdamW), the embedded data set,
``data.num_workers`` 0 on CPU (the loader's crop is part of the step, in the rank's own threads), the
predictor of :data:`SIZES`, ``train.log_every`` 1. After each launch the script deletes the shared-memory
buffers DeepSpeed's CPU all-reduce leaves in /dev/shm (``engine.distributed.remove_shm_buffers``; the ranks
remove their own at exit, this catches a launch that crashed).

Per point: the first ``--warmup`` steps are discarded; throughput is the engine's own figure (``img_per_s`` in
the run's ``metrics.csv``: images of all ranks / rank 0's wall time of the step), combined over the remaining
steps as images / total time; step time = global batch / throughput (mean; the median is saved too); per-rank
img/s = throughput / ranks (data parallelism: each rank takes one batch per step). Peak memory per rank: on CPU
the process's resident high-water mark from the end of the imports to the last step (``peak_rss``: VmHWM,
restarted after the imports by ``benchmarks.common.reset_peak_rss``, so the imports' own peak is not in it;
glibc's default allocator; ``rss_start`` is the resident set after imports, ``peak_above_start_mib`` the
difference), on CUDA ``torch.cuda.max_memory_allocated`` (``benchmarks.common.cuda_peak``). Scaling
efficiency at N ranks = throughput(N) / (N / N0 x throughput(N0)) with N0 the fewest ranks measured for the
same size and stage (1 in the default sweep: throughput(N) / (N x throughput(1))).

Threads (OMP_NUM_THREADS and ``torch.set_num_threads`` in every rank, printed and saved with each point):
by default every rank gets the same number, ``--threads-per-rank`` (CPU: 1, one core per rank as one GPU per
rank; GPU: the node's cores / the most ranks per node), so N ranks use N times the cores of one rank and the
efficiency measures what data parallelism and ZeRO cost (gradient all-reduce or reduce-scatter over gloo /
NCCL, the partitioned optimizer, ZeRO-3's parameter gathers). On 2 cores the 1-rank points then leave a core
idle. ``--threads-per-node T`` instead splits T threads evenly between a node's ranks (1 rank x 2 threads vs
2 ranks x 1 thread on 2 cores): the same cores at every point, so 2 ranks cannot reach more than about half
the ideal efficiency, and ``speedup`` (throughput over the fewest ranks' at the same cores) is the figure to
read. OpenMP threads wait passively (OMP_WAIT_POLICY=passive unless set): on a shared machine spinning
threads made one 2-thread rank 5-30x slower.

CPU defaults: 64 px, patch 8 (an 8 x 8 grid), batch 8 per rank, 4 steps of which the first is warm-up (the
first step is already within ~30% of the later ones). About 12-15 s of every point on idle cores (25-40 s on
a busy machine) is the launcher, two rounds of imports and DeepSpeed's set-up, so 24 points cost at least
5-6 minutes whatever the model; the whole default sweep is meant to take < ~10 min on 2 idle cores (it took
21 min on this project's 2 cores shared with other jobs, load average 6-11). GPU defaults: 224 px, patch 16
(14 for ViT-H), batch 64 per rank, 20 steps of which 5 are warm-up, sizes ti to h, ranks 1, 2, 4, 8 up to
the GPUs present; a point that runs out of memory is reported as failed and the sweep goes on. With
``train.log_every`` 1 a GPU step has one host synchronisation (the logged loss), as at any log step.

Across nodes: run this script on the first host of the hostfile, from a folder every node sees at the same
path (DeepSpeed's multi-node launch needs that anyway); only rank 0 writes, into ``--work`` (default: a
temporary folder beside ``--out``). ``--nodes 1 2`` runs the 1-node points locally and the 2-node points with
``deepspeed --hostfile H --num_nodes 2``; the efficiency base is then the fewest ranks of the sweep.

Writes ``benchmarks/results/scaling.json`` and ``scaling.png`` (throughput vs ranks per size and stage; peak
memory per rank vs stage) and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from benchmarks.common import ROOT, cuda_peak, current_rss, peak_rss, reset_peak_rss
from engine.checkpoint import atomic_write_json
from engine.distributed import free_port, remove_shm_buffers

# short name -> (encoder, predictor depth, width, heads); the predictors of the peer comparison (Ti, S)
# and I-JEPA's 12 x 384 for the large encoders
SIZES = {
    "ti": ("vit_tiny", 6, 192, 6),
    "s": ("vit_small", 6, 384, 12),
    "b": ("vit_base", 6, 384, 12),
    "l": ("vit_large", 12, 384, 12),
    "h": ("vit_huge", 12, 384, 12),
}
CPU_DEFAULTS = dict(sizes=["ti", "s", "b"], ranks=[1, 2], img_size=64, patch=8, batch=8, steps=4, warmup=1,
                    workers=0)
GPU_DEFAULTS = dict(sizes=list(SIZES), ranks=[1, 2, 4, 8], img_size=224, patch=16, batch=64, steps=20, warmup=5,
                    workers=6)
QUICK = dict(sizes=["ti"], ranks=[1, 2], stages=[1], img_size=32, patch=8, batch=8, steps=3, warmup=1)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Point:
    size: str
    stage: int
    nodes: int
    ranks_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def name(self) -> str:
        return f"{self.size}_z{self.stage}_n{self.nodes}x{self.ranks_per_node}"


# ---- pure pieces: config, command, parsing, efficiency, table (tests/test_scaling_benchmark.py) -------------
def point_overrides(point: Point, img_size: int, patch: int, batch: int, steps: int, workers: int) -> List[str]:
    """The ``--set`` overrides of one point, on top of the config defaults."""
    encoder, pdepth, pwidth, pheads = SIZES[point.size]
    if point.size == "h" and img_size % 14 == 0 and patch == 16:
        patch = 14  # ViT-H/14, as I-JEPA and recipes/pretrain_vith.py
    # enough embedded images for at least two steps per epoch on every rank
    per_class = max(8, math.ceil(2 * batch * point.world / 10))
    return [f"model.encoder={encoder}", f"model.patch_size={patch}", f"model.predictor_depth={pdepth}",
            f"model.predictor_width={pwidth}", f"model.predictor_heads={pheads}",
            "data.dataset=embedded", f"data.img_size={img_size}", f"data.batch_size={batch}",
            f"data.num_workers={workers}", f"data.embedded_per_class={per_class}",
            f"train.zero_stage={point.stage}", f"optim.max_steps={steps}", "train.log_every=1",
            "train.eval_every=0", f"train.ckpt_every={10 ** 9}", "train.progress=false", "train.resume=false",
            "eval.mrr_images=1", "eval.mrr_candidates=2"]


def launch_command(deepspeed: str, point: Point, port: int, run_dir: str, threads: int, overrides: Sequence[str],
                   hostfile: Optional[str] = None, master_addr: Optional[str] = None) -> List[str]:
    """The ``deepspeed`` command line of one point (a hostfile only when it spans more than one node)."""
    cmd = [deepspeed, "--num_gpus", str(point.ranks_per_node), "--master_port", str(port)]
    if point.nodes > 1:
        if not hostfile:
            raise SystemExit(f"error: --nodes {point.nodes} needs --hostfile (one line per node: 'host slots=GPUS')")
        cmd += ["--hostfile", hostfile, "--num_nodes", str(point.nodes)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--module", "benchmarks.scaling", "--child", "--threads", str(threads), "--out", run_dir]
    for s in overrides:
        cmd += ["--set", s]
    return cmd


def threads_per_rank(ranks_per_node: int, per_rank: Optional[int], per_node: Optional[int]) -> int:
    """A rank's threads: ``per_rank`` when given, else ``per_node`` split evenly between the node's ranks."""
    return per_rank if per_rank else max(1, per_node // ranks_per_node)


def child_env(threads: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The launcher's environment: no rank variables leaking from this process, explicit threads per rank."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCH_VARS}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "passive")  # no spinning OpenMP threads when the cores are shared
    return env


def step_figures(metrics_rows: List[dict], warmup: int, images_per_step: int) -> dict:
    """Throughput and step time over the logged steps after ``warmup`` (rows of ``metrics.csv``, one per step).

    A row's ``img_per_s`` is images of all ranks / that step's time, so the step took images_per_step / img_per_s
    seconds; throughput over the measured steps = their images / their total time."""
    rows = [r for r in metrics_rows if r.get("img_per_s") not in (None, "") and float(r["step"]) > warmup]
    if not rows:
        raise ValueError(f"no logged step after the {warmup} warm-up steps: raise --steps above --warmup")
    times = [images_per_step / float(r["img_per_s"]) for r in rows]
    tflops = [float(r["tflops_per_device"]) for r in rows if r.get("tflops_per_device") not in (None, "")]
    return {"measured_steps": len(rows), "img_per_s": images_per_step * len(rows) / sum(times),
            "step_s": sum(times) / len(times), "step_s_median": statistics.median(times),
            "tflops_per_rank": statistics.median(tflops) if tflops else None}


def read_metrics(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def efficiency(throughput: float, world: int, base_throughput: float, base_world: int) -> float:
    """Throughput at ``world`` ranks over perfect scaling of the ``base_world`` figure."""
    return throughput / (world / base_world * base_throughput)


def add_efficiency(points: List[dict]) -> List[dict]:
    """Each point's scaling efficiency and speed-up against the fewest ranks measured for its size and stage."""
    for p in points:
        same = [q for q in points if q["size"] == p["size"] and q["stage"] == p["stage"]]
        base = min(same, key=lambda q: q["world"])
        p["efficiency_base_world"] = base["world"]
        p["efficiency"] = efficiency(p["img_per_s"], p["world"], base["img_per_s"], base["world"])
        p["speedup"] = p["img_per_s"] / base["img_per_s"]
    return points


def table(points: List[dict]) -> str:
    """The points as a text table: one row per size, stage and rank count."""
    gpu = bool(points) and points[0]["memory_kind"] == "cuda_max_allocated"
    mem = "GPU peak MiB" if gpu else "peak RSS MiB"
    head = (f"{'size':<5}{'ZeRO':>5}{'ranks':>6}{'threads':>8}{'img/s':>9}{'img/s/rank':>11}{'step s':>8}"
            f"{mem:>13}{'above start':>12}{'speedup':>8}{'efficiency':>11}")
    lines = [head, "-" * len(head)]
    for p in sorted(points, key=lambda q: (list(SIZES).index(q["size"]), q["stage"], q["world"])):
        above = "-" if gpu else f"{p['peak_above_start_mib']:.0f}"
        lines.append(f"{p['size']:<5}{p['stage']:>5}{p['world']:>6}{p['threads_per_rank']:>8}{p['img_per_s']:>9.2f}"
                     f"{p['img_per_s_per_rank']:>11.2f}{p['step_s']:>8.3f}{p['peak_mem_mib']:>13.0f}{above:>12}"
                     f"{p['speedup']:>8.2f}{p['efficiency']:>11.2f}")
    return "\n".join(lines)


def plot(points: List[dict], path: str) -> str:
    """Left: throughput vs ranks, a line per size and stage. Right: peak memory per rank vs ZeRO stage, a line
    per size and rank count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {s: f"C{i}" for i, s in enumerate(SIZES)}
    styles = ["-", "--", ":", "-."]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    sizes = [s for s in SIZES if any(p["size"] == s for p in points)]
    stages = sorted({p["stage"] for p in points})
    worlds = sorted({p["world"] for p in points})
    for size in sizes:
        for i, stage in enumerate(stages):
            pts = sorted((p["world"], p["img_per_s"]) for p in points if p["size"] == size and p["stage"] == stage)
            if pts:
                ax1.plot(*zip(*pts), styles[i % 4], marker="o", color=colors[size], label=f"{size} ZeRO-{stage}")
        for i, world in enumerate(worlds):
            pts = sorted((p["stage"], p["peak_mem_mib"]) for p in points if p["size"] == size and p["world"] == world)
            if pts:
                ax2.plot(*zip(*pts), styles[i % 4], marker="s", color=colors[size], label=f"{size}, {world} ranks")
    ax1.set(xlabel="ranks", ylabel="img/s (all ranks)", yscale="log", xticks=worlds, title="throughput")
    kind = "GPU max allocated" if points and points[0]["memory_kind"] == "cuda_max_allocated" else "peak RSS"
    ax2.set(xlabel="ZeRO stage", ylabel=f"{kind} per rank (MiB)", xticks=stages, title="memory per rank")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the child: one point, on every rank, under the deepspeed launcher ---------------------------------------
def rank_memory(device, rss_start: int, peak_reset: bool) -> dict:
    """This rank's memory at the last step: ``peak_rss`` is the resident high-water mark since the reset after
    the imports (``peak_reset`` False: it could not be restarted, the figure is the whole process's)."""
    import torch

    out = {"host": socket.gethostname(), "threads": torch.get_num_threads(), "rss_start": rss_start,
           "peak_rss": peak_rss(), "peak_reset": peak_reset}
    if device.type == "cuda":
        out["cuda_max_allocated"] = cuda_peak(device)
    return out


def measured_run(cfg, info, rss_start: int, peak_reset: bool):
    """``engine.run.Run`` whose last step measures memory instead of evaluating and writing a checkpoint."""
    from engine.distributed import barrier
    from engine.run import Run

    class MeasuredRun(Run):
        def _evaluate(self, step, sched, meters, task, engine, bar):
            self._check_finite(step, meters)
            barrier()
            return {}

        def _save(self, step, sched, meters, engine, task, loader, results):
            import torch.distributed as dist

            self._check_finite(step, meters)
            ranks = [rank_memory(self.device, rss_start, peak_reset)]
            if dist.is_initialized() and dist.get_world_size() > 1:
                ranks = [None] * dist.get_world_size()
                dist.all_gather_object(ranks, rank_memory(self.device, rss_start, peak_reset))
            if self.info.is_main:
                atomic_write_json(os.path.join(self.dir.path, "point.json"),
                                  {"world": self.info.world_size, "device": str(self.device), "step": step,
                                   "ranks": ranks})

    return MeasuredRun(cfg, info)


def child_main(argv: List[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--child", action="store_true")
    pre.add_argument("--threads", type=int, required=True)
    known, rest = pre.parse_known_args(argv)
    import torch

    torch.set_num_threads(known.threads)  # OMP_NUM_THREADS does not reach other nodes through the launcher
    import deepspeed  # noqa: F401  (imported before rss_start: it belongs to the baseline)

    from engine.cli import apply_args, exit_code_of, recipe_parser
    from engine.config import IWMConfig
    from engine.pretrain import Pretraining
    from engine.run import start_process

    args = recipe_parser(__doc__).parse_args(rest)
    rss_start = current_rss()
    peak_reset = reset_peak_rss()  # the peak from here on: the run alone, not the imports

    def go():
        cfg = apply_args(IWMConfig(name="scaling"), args)
        info = start_process()
        measured_run(cfg, info, rss_start, peak_reset).fit(Pretraining(cfg, info.device, info.rank))
        if torch.distributed.is_initialized():  # every rank leaves together, the process group closed
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    return exit_code_of(go)


# ---- the sweep --------------------------------------------------------------------------------------------
def run_point(point: Point, opts, work: str) -> dict:
    """Launch one point and read back its figures (raises RuntimeError with the launcher's tail on failure)."""
    run_dir = os.path.join(work, point.name)
    threads = threads_per_rank(point.ranks_per_node, opts.threads_per_rank, opts.threads_per_node)
    overrides = point_overrides(point, opts.img_size, opts.patch, opts.batch, opts.steps, opts.workers)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = free_port()
    cmd = launch_command(deepspeed if os.path.exists(deepspeed) else "deepspeed", point, port, run_dir,
                         threads, overrides, opts.hostfile, opts.master_addr)
    started = time.time()
    # a session of its own: on a timeout the launcher and every rank it started go, not only the launcher
    with subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as p:
        try:
            output, _ = p.communicate(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise RuntimeError(f"{point.name}: still running after --timeout {opts.timeout} s: stopped") from None
        finally:
            remove_shm_buffers(port)
    if p.returncode or not os.path.exists(os.path.join(run_dir, "point.json")):
        tail = output[-3000:].strip().splitlines()
        raise RuntimeError(f"{point.name}: exit {p.returncode}: " + " | ".join(tail[-6:]))
    with open(os.path.join(run_dir, "point.json")) as f:
        measured = json.load(f)
    figures = step_figures(read_metrics(os.path.join(run_dir, "metrics.csv")), opts.warmup, opts.batch * point.world)
    cuda = "cuda_max_allocated" in measured["ranks"][0]
    mem = [r["cuda_max_allocated"] if cuda else r["peak_rss"] for r in measured["ranks"]]
    return dict(size=point.size, encoder=SIZES[point.size][0], stage=point.stage, nodes=point.nodes,
                ranks_per_node=point.ranks_per_node, world=measured["world"],
                threads_per_rank=measured["ranks"][0]["threads"], batch_per_rank=opts.batch,
                global_batch=opts.batch * point.world, steps=opts.steps, warmup=opts.warmup, **figures,
                img_per_s_per_rank=figures["img_per_s"] / measured["world"],
                memory_kind="cuda_max_allocated" if cuda else "peak_rss", peak_mem_mib=max(mem) / 2 ** 20,
                peak_mem_per_rank_mib=[m / 2 ** 20 for m in mem],
                rss_start_mib=[r["rss_start"] / 2 ** 20 for r in measured["ranks"]],
                peak_above_start_mib=max(r["peak_rss"] - r["rss_start"] for r in measured["ranks"]) / 2 ** 20,
                hosts=sorted({r["host"] for r in measured["ranks"]}), master_port=port,
                wall_s=time.time() - started,
                overrides=overrides)


def run_with_retries(point: Point, opts, work: str, failed: List[dict], tag: str) -> Optional[dict]:
    """Run a point, again up to ``--retries`` times when it fails. Every failure is kept in ``failed``, marked
    ``retried`` when another attempt followed; a row records its ``attempts``."""
    for attempt in range(1 + opts.retries):
        shutil.rmtree(os.path.join(work, point.name), ignore_errors=True)
        try:
            row = run_point(point, opts, work)
            row["attempts"] = attempt + 1
            return row
        except (RuntimeError, ValueError) as e:
            final = attempt == opts.retries
            failed.append({"point": point.name, "attempt": attempt + 1, "retried": not final,
                           "error": str(e)[-2000:]})
            print(f"{tag} {'failed' if final else 'failed, retrying'}: {str(e)[-600:]}", flush=True)
    return None


def parse_args(argv: Optional[List[str]]):
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), help="encoder sizes (CPU: ti s b; GPU: ti s b l h)")
    ap.add_argument("--ranks", nargs="+", type=int, help="ranks per node (CPU: 1 2; GPU: 1 2 4 8 up to the GPUs)")
    ap.add_argument("--stages", nargs="+", type=int, choices=[0, 1, 2, 3], help="ZeRO stages (default 0 1 2 3)")
    ap.add_argument("--steps", type=int, help="steps per point, warm-up included (CPU 6, GPU 20)")
    ap.add_argument("--warmup", type=int, help="first steps not measured (CPU 2, GPU 5)")
    ap.add_argument("--img-size", type=int, help="image size in pixels (CPU 64, GPU 224)")
    ap.add_argument("--patch", type=int, help="patch size (CPU 8, GPU 16; ViT-H takes 14 when the image allows)")
    ap.add_argument("--batch", type=int, help="images per rank per step (CPU 8, GPU 64)")
    ap.add_argument("--workers", type=int, help="loader workers per rank (CPU 0, GPU 6)")
    threads = ap.add_mutually_exclusive_group()
    threads.add_argument("--threads-per-rank", type=int, default=None,
                         help="threads of every rank at every point (CPU default 1; GPU: cores / most ranks per node)")
    threads.add_argument("--threads-per-node", type=int, default=None,
                         help="instead split this many threads evenly between a node's ranks (the same cores at "
                              "every point)")
    ap.add_argument("--quick", action="store_true", help="smoke sweep: ti x 1, 2 ranks x ZeRO 1, 32 px, 5 steps")
    ap.add_argument("--nodes", nargs="+", type=int, default=[1], help="node counts (> 1 needs --hostfile)")
    ap.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('host slots=GPUS' per line)")
    ap.add_argument("--master-addr", default=None, help="rendezvous host across nodes (default: DeepSpeed's)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scaling.json"),
                    help="JSON path; the PNG goes beside it with the same name")
    ap.add_argument("--work", default=None, help="folder for the points' run directories (kept when given)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point before it counts as failed")
    ap.add_argument("--retries", type=int, default=1, help="launch a failed point again this many times")
    args = ap.parse_args(argv)
    defaults = dict(GPU_DEFAULTS if cuda else CPU_DEFAULTS, stages=[0, 1, 2, 3])
    if args.quick:
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cuda and args.ranks == GPU_DEFAULTS["ranks"]:
        args.ranks = [r for r in args.ranks if r <= torch.cuda.device_count()]
    if args.threads_per_rank is None and args.threads_per_node is None:
        args.threads_per_rank = max(1, os.cpu_count() // max(args.ranks)) if cuda else 1
    args.device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    return args


def check_args(args) -> Optional[str]:
    """One line naming the problem and the fix, or None."""
    if min(args.ranks) < 1 or min(args.nodes) < 1:
        return "--ranks and --nodes take positive counts, e.g. --ranks 1 2"
    if args.warmup < 0 or args.steps <= args.warmup:
        return f"--steps {args.steps} must exceed --warmup {args.warmup}: some steps have to be measured"
    if args.img_size % args.patch:
        return f"--img-size {args.img_size} is not a multiple of --patch {args.patch}: pick one that is"
    if max(args.nodes) > 1 and not args.hostfile:
        return "--nodes above 1 needs --hostfile FILE (one line per node: 'host slots=GPUS')"
    if args.hostfile and not os.path.isfile(args.hostfile):
        return f"--hostfile {args.hostfile} does not exist: give DeepSpeed's hostfile ('host slots=GPUS' per line)"
    if args.retries < 0 or args.timeout < 1:
        return f"--retries {args.retries} / --timeout {args.timeout}: use --retries >= 0 and --timeout >= 1 s"
    if min(t for t in (args.threads_per_rank, args.threads_per_node) if t is not None) < 1:
        return "--threads-per-rank / --threads-per-node: need at least one thread"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child_main(argv)
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    points = [Point(s, z, n, r) for s in args.sizes for z in args.stages for n in args.nodes for r in args.ranks]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="scaling_runs_", dir=os.path.dirname(os.path.abspath(args.out)))
    print(f"{len(points)} points on {args.device}: {args.img_size} px, patch {args.patch}, batch {args.batch} per "
          f"rank, {args.steps} steps ({args.warmup} warm-up); threads: {thread_policy(args)}")
    load_before, started, rows, failed = os.getloadavg(), time.time(), [], []
    try:
        for i, point in enumerate(points, 1):
            row = run_with_retries(point, args, work, failed, f"[{i}/{len(points)}]")
            if row is not None:
                rows.append(row)
                print(f"[{i}/{len(points)}] {point.name}: {row['img_per_s']:.1f} img/s, step {row['step_s']:.3f} s, "
                      f"peak {row['peak_mem_mib']:.0f} MiB/rank ({row['wall_s']:.0f} s)", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return report(args, add_efficiency(rows), failed, load_before, time.time() - started)


def thread_policy(args) -> str:
    per = {r: threads_per_rank(r, args.threads_per_rank, args.threads_per_node) for r in args.ranks}
    how = (f"{args.threads_per_rank} per rank at every point" if args.threads_per_rank
           else f"{args.threads_per_node} per node split between its ranks")
    return how + " (" + ", ".join(f"{r} rank{'s' * (r > 1)} x {t}" for r, t in per.items()) + ")"


def report(args, rows: List[dict], failed: List[dict], load_before, wall_s: float) -> int:
    from importlib.metadata import version

    import torch

    policy = thread_policy(args)
    if rows:
        print("\n" + table(rows))
    note = ("efficiency = img/s at N ranks / (N / N0 x img/s at N0), N0 the fewest ranks of that size and stage; "
            + ("every rank has the same threads: 1.00 is perfect scaling" if args.threads_per_rank else
               "the same cores at every point: N ranks top out near N0 / N, read speedup (1.00: ranks cost nothing)"))
    print(f"\nthreads: {policy}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'passive')}\n{note}\n"
          f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          f"(other jobs on the machine count in it)")
    png = plot(rows, os.path.splitext(args.out)[0] + ".png") if rows else None
    result = dict(benchmark="scaling", device=args.device, cores=os.cpu_count(), torch=torch.__version__,
                  deepspeed=version("deepspeed"), python=platform.python_version(), threads_policy=policy,
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "passive"), efficiency_note=note,
                  settings=dict(sizes=args.sizes, ranks=args.ranks, stages=args.stages, nodes=args.nodes,
                                img_size=args.img_size, patch=args.patch, batch_per_rank=args.batch,
                                steps=args.steps, warmup=args.warmup, workers=args.workers, quick=args.quick),
                  load_average_before=list(load_before), load_average_after=list(os.getloadavg()),
                  wall_s=wall_s, points=rows, failed=failed, plot=png and os.path.relpath(png, ROOT))
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}" + (f" and {png}" if png else "") + f" ({wall_s:.0f} s)")
    return 1 if any(not f["retried"] for f in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
