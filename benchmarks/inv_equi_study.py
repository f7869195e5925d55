"""The invariant / equivariant study at CPU scale: does the paper's direction hold for tiny IWMs?

    OMP_NUM_THREADS=1 python -m benchmarks.inv_equi_study           # the study (docs/results.md)
    python -m benchmarks.inv_equi_study --quick                    # a smoke check of every stage (seconds)

Two IWMs are pretrained on the embedded data from the demo recipe (``recipes/pretrain_tiny.config()``: its
network, image size, steps and optimiser; read from the recipe, never copied):

    equi  the demo recipe itself: the strong jitter (``engine.config.strong_jitter``) + the destructive
          augmentations (blur, grayscale, solarize), its predictor of depth d
    inv   the same run with the config defaults' mild jitter (0.4 / 0.4 / 0.2 / 0.1; the destructive defaults
          kept, as the paper's jitter + destructive row) and a shallower predictor of round(2d / 3) blocks
          (the paper's Inv 12 against Equi 18)

and each is measured with the engine's own commands: MRR (``engine.eval mrr``, 256 candidates x 128 val
images, 95% interval), the linear probe (``engine.eval linear --protocol paper``), the attentive probe
(``engine.eval attentive``), predictor finetuning with the pretrained predictor and with a random one (the
paper's control; ``engine.finetune.finetune`` from ``recipes/finetune_predictor*.py``'s configs, shortened).
A randomly initialised encoder of the same network is probed too: the floor a pretrained encoder must beat.

Output: a markdown table on stdout, ``benchmarks/results/inv_equi.json`` and ``inv_equi.png`` (``--quick``:
``inv_equi_quick.*``). Each model runs in its own process (``--jobs 2``: both at once, one core each).
Every stage's result is kept in ``ROOT/<model>/study.json`` with the pretraining step it measured: a rerun
skips what is done, and the runs resume where they stopped. ``--fresh`` recomputes everything (the engine
moves an older run to ``previous/``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time

from benchmarks.common import ROOT
from engine.checkpoint import atomic_write_json
from engine.config import IWMConfig, ViewConfig, load_recipe

MODELS = ("inv", "equi")
REFERENCE = "random"  # the randomly initialised encoder (probes only)
STAGES = ("mrr", "linear", "attentive", "predictor", "predictor_random")
PROBE_EPOCHS = 10  # probe runs: 10 epochs of the 2000 embedded train images, batch 64
FINETUNE_EPOCHS = 10  # predictor finetuning: 10 epochs of batch 32, 620 steps (5 left more runs on the ln 10 plateau)
MRR_IMAGES = 128
# a few hundred steps on 2000 images, as the finetuning tests: no mixup / cutmix / RandAugment / stochastic depth,
# milder crops (the recipes' regularisation is set for 100 ImageNet epochs)
FINETUNE_SETTINGS = ["finetune.mixup=0.0", "finetune.cutmix=0.0", "finetune.randaugment=''",
                     "finetune.crop_scale=(0.5, 1.0)", "finetune.drop_path=0.0", "data.batch_size=32",
                     "data.num_workers=1", "train.log_every=25", "train.progress=False"]


def recipe(name: str) -> IWMConfig:
    """The config of ``recipes/<name>.py`` (engine.config.load_recipe)."""
    return load_recipe(os.path.join(ROOT, "recipes", f"{name}.py"))


# ----------------------------------------------------------------------------------------------------
# The two pretraining runs
# ----------------------------------------------------------------------------------------------------
def pretrain_config(model: str, root: str, quick: bool) -> IWMConfig:
    """The demo recipe (equi), or its invariant sibling: mild default jitter, a 2/3-deep predictor (inv)."""
    from engine.cli import smoke_config

    cfg = recipe("pretrain_tiny")
    if quick:
        smoke_config(cfg)
    if model == "inv":
        cfg.model.predictor_depth = max(1, round(2 * cfg.model.predictor_depth / 3))
        cfg.views = ViewConfig(jitter_order=cfg.views.jitter_order)
    cfg.name = f"inv_equi_{model}"
    cfg.train.out_dir = os.path.join(root, model, "pretrain")
    cfg.train.progress = False
    return cfg.validate()


def total_steps(cfg: IWMConfig) -> int:
    """The run's optimizer steps, as the run core counts them on one rank."""
    from engine.data import build_dataset
    from engine.run import Schedule

    n = len(build_dataset(cfg.data, cfg.views, split="train"))
    return Schedule.build(cfg, n // cfg.data.batch_size, 1).total


def pretrained(cfg: IWMConfig, fresh: bool):
    """Pretrain (or resume, or reuse a complete run); returns (checkpoint.pt, seconds spent or None if reused)."""
    from engine import checkpoint as ckpt_lib
    from engine.pretrain import pretrain

    path = os.path.join(cfg.train.out_dir, "checkpoint.pt")
    if not fresh and os.path.isfile(path) and ckpt_lib.load_weights(path).get("step") == total_steps(cfg):
        print(f"pretraining: {path} is complete, reused", flush=True)
        return path, None
    cfg.train.resume = not fresh
    started = time.time()
    result = pretrain(cfg)
    print(f"pretraining: {result.step} steps in {time.time() - started:.0f} s, final loss {result.final_loss:.4f}",
          flush=True)
    return path, round(time.time() - started)


def random_reference(equi: IWMConfig, root: str) -> str:
    """A randomly initialised encoder (and predictor) of the equi network, saved as a pretraining checkpoint."""
    import torch

    from engine import checkpoint as ckpt_lib
    from engine.models import IWM

    path = os.path.join(root, REFERENCE, "checkpoint.pt")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.manual_seed(equi.train.seed)
        net = IWM(equi)
        ckpt_lib.save_weights(path, config=equi.to_dict(), step=0, encoder=net.encoder, predictor=net.predictor,
                              target_encoder=net.encoder)
    return path


# ----------------------------------------------------------------------------------------------------
# The measurements: the eval CLI's functions and the finetuning API
# ----------------------------------------------------------------------------------------------------
def eval_command(argv, out_json: str) -> dict:
    from engine.cli import eval_main

    if eval_main(argv + ["--out", out_json]) != 0:
        raise SystemExit(f"python -m engine.eval {' '.join(argv)} failed (see above)")
    with open(out_json) as f:
        return json.load(f)


def measure_mrr(ckpt: str, out: str, quick: bool) -> dict:
    size = ["--images", "4", "--candidates", "8"] if quick else ["--images", str(MRR_IMAGES), "--candidates", "256"]
    r = eval_command(["mrr", "--ckpt", ckpt] + size, os.path.join(out, "mrr.json"))
    return {"value": r["mrr"], "ci95": r["ci95"], "chance": r["chance"], "images": r["images"],
            "candidates": r["candidates"]}


def measure_probe(kind: str, ckpt: str, out: str, quick: bool) -> dict:
    epochs = ["--epochs", "1", "--set", "optim.max_steps=3"] if quick else ["--epochs", str(PROBE_EPOCHS)]
    argv = ([kind, "--protocol", "paper"] if kind == "linear" else [kind]) + ["--ckpt", ckpt] + epochs
    r = eval_command(argv + ["--run-dir", os.path.join(out, f"probe_{kind}")], os.path.join(out, f"{kind}.json"))
    return {"value": r["val_top1"], "val_images": r["val_images"], "steps": r["steps"]}


def measure_predictor_finetuning(init: str, ckpt: str, out: str, quick: bool, fresh: bool) -> dict:
    """recipes/finetune_predictor.py (init 'pretrained') or its random-predictor control, on the embedded data."""
    from engine.finetune import finetune

    cfg = recipe("finetune_predictor" if init == "pretrained" else "finetune_predictor_random")
    for assignment in FINETUNE_SETTINGS:
        cfg.override(assignment)
    cfg.data.dataset, cfg.finetune.val_data, cfg.finetune.checkpoint = "embedded", "", ckpt
    cfg.optim.epochs, cfg.optim.warmup_epochs = FINETUNE_EPOCHS, 1
    cfg.train.eval_every, cfg.train.ckpt_every = 0, 10 ** 9  # evaluate and save at the end
    if quick:
        cfg.data.batch_size, cfg.optim.max_steps, cfg.finetune.eval_batch_size = 8, 3, 16
    cfg.train.out_dir = os.path.join(out, f"finetune_predictor_{init}")
    cfg.train.resume = not fresh and same_run(cfg)
    result = finetune(cfg)
    return {"value": result.metrics["best_top1"], "val_images": int(result.metrics["val_images"]),
            "steps": result.step}


def same_run(cfg: IWMConfig) -> bool:
    """Whether the run folder holds this very run (interrupted: resume it), not one with other settings."""
    try:
        with open(os.path.join(cfg.train.out_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return True
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as saved
    return all(saved.get(k) == now[k] for k in ("data", "optim", "finetune"))


def settings(stage: str, quick: bool) -> dict:
    """What a stage's result depends on besides the pretraining checkpoint: a change recomputes the stage."""
    if stage == "mrr":
        return {"quick": quick, "images": MRR_IMAGES}
    if stage in ("linear", "attentive"):
        return {"quick": quick, "epochs": PROBE_EPOCHS}
    return {"quick": quick, "epochs": FINETUNE_EPOCHS, "overrides": FINETUNE_SETTINGS}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_model(model: str, root: str, quick: bool, fresh: bool) -> None:
    """Every stage for one model (a child process): pretraining, then each measurement, results kept in
    ROOT/<model>/study.json and skipped when already there for the same pretraining step."""
    from engine import checkpoint as ckpt_lib

    out = os.path.join(root, model)
    os.makedirs(out, exist_ok=True)
    book = os.path.join(out, "study.json")
    cpu = cpu_seconds()
    if model == REFERENCE:
        cfg = pretrain_config("equi", root, quick)
        ckpt, seconds, stages = random_reference(cfg, root), None, ("linear", "attentive")
    else:
        cfg = pretrain_config(model, root, quick)
        (ckpt, seconds), stages = pretrained(cfg, fresh), STAGES
    step = ckpt_lib.load_weights(ckpt).get("step")
    done = {}
    if not fresh and os.path.isfile(book):
        with open(book) as f:
            done = json.load(f)
    if done.get("step") != step:  # another pretraining run: nothing measured before applies
        done = {}
    done.update(model=model, step=step, checkpoint=ckpt, predictor_depth=cfg.model.predictor_depth,
                views=dataclasses.asdict(cfg.views))
    if seconds is not None:
        done["pretrain_s"], done["pretrain_cpu_s"] = seconds, round(cpu_seconds() - cpu)
    for stage in stages:
        before = done.get("results", {}).get(stage)
        if before is not None and before.get("settings") == settings(stage, quick):
            print(f"{stage}: done before ({before['value']:.4g}), skipped", flush=True)
            continue
        t, cpu = time.time(), cpu_seconds()
        if stage == "mrr":
            r = measure_mrr(ckpt, out, quick)
        elif stage in ("linear", "attentive"):
            r = measure_probe(stage, ckpt, out, quick)
        else:
            r = measure_predictor_finetuning("random" if stage.endswith("random") else "pretrained", ckpt, out,
                                             quick, fresh)
        r.update(seconds=round(time.time() - t), cpu_seconds=round(cpu_seconds() - cpu),
                 settings=settings(stage, quick))
        done.setdefault("results", {})[stage] = r
        atomic_write_json(book, done)
        print(f"{stage}: {r['value']:.4g} in {r['seconds']} s ({r['cpu_seconds']} s CPU)", flush=True)
    atomic_write_json(book, done)


# ----------------------------------------------------------------------------------------------------
# The parent: one child process per model, then the table, the JSON and the plot
# ----------------------------------------------------------------------------------------------------
def child_env(threads: int) -> dict:
    """This environment without a rendezvous (each child is its own one-rank run), ROOT importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_children(args) -> None:
    """Each model (and the random reference) in its own process, ``args.jobs`` at a time; logs in ROOT/<model>/."""
    queue = list(MODELS) + [REFERENCE]
    running = []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    while queue or running:
        while queue and len(running) < args.jobs:
            model = queue.pop(0)
            os.makedirs(os.path.join(args.root, model), exist_ok=True)
            log = open(os.path.join(args.root, model, "study.log"), "w")
            cmd = [sys.executable, "-m", "benchmarks.inv_equi_study", "--model", model, "--root", args.root]
            cmd += ["--quick"] * args.quick + ["--fresh"] * args.fresh
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads), cwd=ROOT)
            running.append((model, proc, log, time.time()))
            print(f"[{model}] started (log: {log.name})", flush=True)
        time.sleep(1)
        for item in list(running):
            model, proc, log, t = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode:
                with open(log.name) as f:
                    tail = f.read()[-3000:]
                raise SystemExit(f"[{model}] failed (exit {proc.returncode}); the end of {log.name}:\n{tail}")
            print(f"[{model}] done in {time.time() - t:.0f} s", flush=True)


COLUMNS = [("mrr", "MRR (95% interval)"), ("linear", "linear probe"), ("attentive", "attentive probe"),
           ("predictor", "frozen enc + pretrained pred"), ("predictor_random", "frozen enc + random pred")]


def gather(root: str) -> dict:
    rows = {}
    for model in list(MODELS) + [REFERENCE]:
        with open(os.path.join(root, model, "study.json")) as f:
            rows[model] = json.load(f)
        rows[model]["checkpoint"] = os.path.relpath(rows[model]["checkpoint"], ROOT)
    return rows


def cell(stage: str, r: dict) -> str:
    if r is None:
        return ""
    if stage == "mrr":
        lo, hi = r["ci95"]
        return f"{r['value']:.3f} ({lo:.3f}-{hi:.3f})"
    return f"{r['value']:.1f}"


def table(rows: dict) -> str:
    names = {"inv": "Inv-like", "equi": "Equi-like (the demo recipe)", REFERENCE: "random init (reference)"}
    lines = ["| model | predictor depth | jitter (b/c/s/h) | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for model, row in rows.items():
        v = row["views"]
        jitter = "/".join(f"{v[k]:g}" for k in ("brightness", "contrast", "saturation", "hue"))
        jitter = "-" if model == REFERENCE else jitter
        depth = "-" if model == REFERENCE else str(row["predictor_depth"])
        cells = [cell(stage, row.get("results", {}).get(stage)) for stage, _ in COLUMNS]
        lines.append(f"| {names[model]} | {depth} | {jitter} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(a: dict, b: dict, names: str, mrr: bool = False) -> str:
    """Is a's value above b's? 'yes' / 'no, the opposite' when the difference exceeds the noise (MRR: 95%
    intervals apart; top-1: two binomial standard errors of the difference on the val images), else 'within
    noise'. ``names``: 'A vs B', shown with the two values."""
    first, second = names.split(" vs ")
    if mrr:
        above, below = a["ci95"][0] > b["ci95"][1], a["ci95"][1] < b["ci95"][0]
        detail = f"{first} {a['value']:.3f} vs {second} {b['value']:.3f}"
    else:
        pa, pb = a["value"] / 100, b["value"] / 100
        se = 100 * math.sqrt(pa * (1 - pa) / a["val_images"] + pb * (1 - pb) / b["val_images"])
        diff = a["value"] - b["value"]
        above, below = diff > 2 * se, diff < -2 * se
        detail = f"{first} {a['value']:.1f} vs {second} {b['value']:.1f}, 2 SE = {2 * se:.1f} pp"
    return ("yes" if above else "no, the opposite" if below else "within noise") + f" ({detail})"


def verdicts(rows: dict) -> list:
    """The paper's claims, each checked on the measured numbers: (claim, verdict)."""
    r = {m: rows[m]["results"] for m in rows}
    name = {"inv": "Inv", "equi": "Equi", REFERENCE: "random"}
    return [
        ("Equi has the higher MRR", compare(r["equi"]["mrr"], r["inv"]["mrr"], "Equi vs Inv", mrr=True)),
        ("Equi finetunes better through its pretrained predictor",
         compare(r["equi"]["predictor"], r["inv"]["predictor"], "Equi vs Inv")),
        ("Equi has the lower linear probe", compare(r["inv"]["linear"], r["equi"]["linear"], "Inv vs Equi")),
        ("Equi has the lower attentive probe", compare(r["inv"]["attentive"], r["equi"]["attentive"], "Inv vs Equi")),
    ] + [(f"{name[m]}: the pretrained predictor beats the random-predictor control",
          compare(r[m]["predictor"], r[m]["predictor_random"], "pretrained vs random")) for m in MODELS] + [
        (f"{name[m]}: the {k} probe beats the same probe on a random encoder",
         compare(r[m][k], r[REFERENCE][k], f"{name[m]} vs random")) for m in MODELS for k in ("linear", "attentive")]


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.0 * len(COLUMNS), 3.4))
    colours = {"inv": "tab:blue", "equi": "tab:orange", REFERENCE: "0.6"}
    top = 1.25 * max(r["value"] for row in rows.values() for k, r in row.get("results", {}).items() if k != "mrr")
    for ax, (stage, title) in zip(axes, COLUMNS):
        models = [m for m in rows if stage in rows[m].get("results", {})]
        values = [rows[m]["results"][stage]["value"] for m in models]
        bars = ax.bar(range(len(models)), values, color=[colours[m] for m in models])
        r = [rows[m]["results"][stage] for m in models]
        if stage == "mrr":
            err = [[v - x["ci95"][0] for v, x in zip(values, r)], [x["ci95"][1] - v for v, x in zip(values, r)]]
            ax.axhline(r[0]["chance"], ls="--", c="k", lw=1, label="chance")
            ax.legend(fontsize=8, loc="upper left")
        else:  # the binomial 95% interval on the val images
            err = [1.96 * 100 * math.sqrt(v / 100 * (1 - v / 100) / x["val_images"]) for v, x in zip(values, r)]
            ax.axhline(10.0, ls="--", c="k", lw=1)  # chance: 10 classes
            ax.set_ylabel("val top-1 (%)")
            ax.set_ylim(0, top)
        ax.errorbar(range(len(models)), values, yerr=err, fmt="none", ecolor="k", capsize=4)
        ax.bar_label(bars, fmt="%.3f" if stage == "mrr" else "%.1f", fontsize=8, label_type="center", color="w")
        if stage == "mrr":
            ax.set_ylim(0, 1.3 * max(x["ci95"][1] for x in r))
        ax.set_xticks(range(len(models)), [{"inv": "Inv", "equi": "Equi", REFERENCE: "random"}[m] for m in models])
        ax.set_title(title, fontsize=9)
    fig.suptitle("Inv-like vs Equi-like tiny IWM on the embedded data (bars: 95% intervals; dashed: chance)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_cost(rows: dict):
    """(wall seconds, CPU seconds) summed over every stage of every model, however many invocations ran them."""
    wall = cpu = 0
    for row in rows.values():
        wall += row.get("pretrain_s", 0) + sum(r.get("seconds", 0) for r in row.get("results", {}).values())
        cpu += row.get("pretrain_cpu_s", 0) + sum(r.get("cpu_seconds", 0) for r in row.get("results", {}).values())
    return wall, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every stage at smoke size (seconds)")
    p.add_argument("--root", default=None,
                   help="where the runs go (default runs/inv_equi, --quick runs/inv_equi_quick)")
    p.add_argument("--jobs", type=int, default=2, help="models measured at once, one process each")
    p.add_argument("--fresh", action="store_true", help="recompute everything (older runs go to previous/)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/inv_equi[_quick].json); "
                                               "the PNG goes beside it")
    p.add_argument("--model", choices=MODELS + (REFERENCE,), default=None, help=argparse.SUPPRESS)  # a child
    args = p.parse_args(argv)
    args.root = os.path.abspath(args.root or os.path.join(ROOT, "runs", "inv_equi_quick" if args.quick else "inv_equi"))
    if args.model:
        run_model(args.model, args.root, args.quick, args.fresh)
        return 0
    command = "python -m benchmarks.inv_equi_study" + " --quick" * args.quick
    started = time.time()
    run_children(args)
    rows = gather(args.root)
    seconds = time.time() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime  # the children's CPU time: what the study costs on free cores
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"inv_equi{'_quick' * args.quick}.json")
    png = os.path.splitext(out)[0] + ".png"
    plot(rows, png)
    checks = verdicts(rows)
    stage_wall, stage_cpu = stage_cost(rows)
    payload = {"command": command, "stage_seconds": stage_wall, "stage_cpu_seconds": stage_cpu,
               "this_invocation": {"seconds": round(seconds), "cpu_seconds": round(cpu)}, "jobs": args.jobs,
               "threads_per_job": child_env(max(1, (os.cpu_count() or 1) // args.jobs))["OMP_NUM_THREADS"],
               "quick": args.quick, "root": os.path.relpath(args.root, ROOT), "models": rows,
               "claims": [{"claim": c, "verdict": v} for c, v in checks], "png": os.path.relpath(png, ROOT)}
    atomic_write_json(out, payload)
    print(f"\n$ {command}   (this invocation: {seconds / 60:.1f} min wall, {cpu / 60:.1f} min CPU; the study's stages, summed: "
          f"{stage_wall / 60:.1f} min wall, {stage_cpu / 60:.1f} min CPU = about {stage_cpu / 120:.1f} min on "
          f"2 free cores)\n")
    print(table(rows))
    print()
    for claim, verdict in checks:
        print(f"- {claim}: {verdict}")
    print("\nwall seconds per stage (CPU seconds where recorded):")
    for model, row in rows.items():
        parts = [f"pretraining {row['pretrain_s']}" + (f" ({row['pretrain_cpu_s']})" if "pretrain_cpu_s" in row else "")
                 ] if "pretrain_s" in row else []
        parts += [f"{k} {v['seconds']}" + (f" ({v['cpu_seconds']})" if "cpu_seconds" in v else "")
                  for k, v in row.get("results", {}).items()]
        print(f"  {model}: " + ", ".join(parts))
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
