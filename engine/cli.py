"""The command line, in one place: the flags every recipe shares, the eval commands, and the one handler
that turns bad input into one line and exit code 2.

    python recipes/pretrain_tiny.py [--data DIR] [--out DIR] [--steps N] [--fresh] [--smoke] [--init WEIGHTS]
                                     [--set SECTION.FIELD=VALUE]
    python recipes/finetune_encoder.py --ckpt PRETRAIN_RUN [--data TRAIN_DIR --val VAL_DIR] [...]
    python -m engine.eval mrr       --ckpt RUN [--data DIR] [--images N] [--candidates K]
    python -m engine.eval linear    --ckpt RUN [--data TRAIN_DIR --val VAL_DIR] [--protocol quick|paper]
    python -m engine.eval attentive --ckpt RUN [--data TRAIN_DIR --val VAL_DIR] [--epochs E]
    python -m engine.eval finetune  --ckpt FINETUNE_RUN [--data TRAIN_DIR --val VAL_DIR]
    python -m engine.eval report    RUN [RUN ...]
    python -m engine.eval imagine   --ckpt RUN --image FILE [--out PNG] [--candidates K] [--top T] [--seed S]
    python -m engine.plan RECIPE --gpus N [--gpu-mem GIB] [--gpu h100|a100] [--json PATH]
    python -m engine.export RUN OUT [--part target_encoder|encoder|predictor]
    python -m engine.data shard IMAGEFOLDER OUT [--samples-per-shard N] [--seed S]

The commands' modules run them from a package ``__main__`` (``engine/eval/__main__.py``,
``engine/plan/__main__.py``, ``engine/export/__main__.py``, ``engine/data/__main__.py``): nothing imported by
this file imports it back (tests/test_import_cycles.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

import torch

from engine.checkpoint import CheckpointError, atomic_write_json
from engine.config import ConfigError, IWMConfig
from engine.data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def exit_code_of(fn: Callable[[], object]) -> int:
    """Run ``fn``; bad input (config, data, checkpoint, divergence) -> one line on stderr and exit code 2; a
    stop at a signal after a complete save -> one line (main rank) on how to continue and exit code 75
    (engine/preempt.py lists the codes)."""
    from engine.preempt import Preempted
    from engine.run import TrainingDiverged

    try:
        fn()
    except (*USER_ERRORS, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    return 0


# ----------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------
def recipe_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the DeepSpeed launcher appends --local_rank=N (torchrun sets LOCAL_RANK instead)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None,
                   help="ImageNet-style folder of class subfolders, or a folder of WebDataset tar shards (python -m "
                        "engine.data shard) (default: the recipe's, often 'embedded')")
    p.add_argument("--out", default=None, help="run directory (train.out_dir)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (optim.max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set model.conditioning=none (repeatable)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: an existing run in the directory is moved to previous/<time>/ once the new "
                        "run has started")
    p.add_argument("--smoke", action="store_true",
                   help="the recipe's code paths (ZeRO stage, conditioning, masks, protocol, heads) at a size that "
                        "runs in seconds on CPU: tiny widths and depth, 32 px, embedded data, 4 steps")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="warm start: a new run from these weights (our checkpoint.pt / model.safetensors / run "
                        "directory, or an I-JEPA checkpoint), step 0, fresh optimizer (train.init)")
    p.add_argument("--ckpt", default=None, help="finetuning recipes: the pretraining run (checkpoint.pt or its "
                                                "folder) to start from (finetune.checkpoint)")
    p.add_argument("--val", default=None, help="finetuning recipes: the labelled val folder (finetune.val_data)")
    return p


def smoke_config(cfg: IWMConfig) -> IWMConfig:
    """``--smoke``: shrink widths, depth, image size, data and steps; keep every switch that picks a code path
    (ZeRO stage, conditioning, masks, views, finetune protocol and head). A finetuning run takes its network
    from the checkpoint, so there only the data and steps shrink."""
    m = cfg.model
    m.encoder, m.embed_dim, m.depth, m.num_heads, m.patch_size = "custom", 48, 2, 4, 8
    m.predictor_depth, m.predictor_width, m.predictor_heads = 2, 32, 4
    d = cfg.data
    d.dataset, d.img_size, d.batch_size, d.num_workers = "embedded", 32, 8, 0
    d.embedded_per_class, d.embedded_native_size = 8, 48
    cfg.optim.max_steps, cfg.optim.warmup_epochs = 4, 0.5
    if cfg.optim.global_batch is not None:  # keep the accumulation path: two micro-batches per step
        cfg.optim.global_batch = 2 * d.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    t = cfg.train
    t.out_dir = os.path.join("runs", "smoke", cfg.name)
    t.log_every, t.eval_every, t.ckpt_every, t.progress = 2, 0, 2, False
    cfg.eval.mrr_images, cfg.eval.mrr_candidates = 2, 8
    cfg.finetune.eval_batch_size = 16
    return cfg


def apply_args(cfg: IWMConfig, args: argparse.Namespace) -> IWMConfig:
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if getattr(args, "smoke", False):
        smoke_config(cfg)
    if getattr(args, "ckpt", None):
        cfg.finetune.checkpoint = args.ckpt
    if getattr(args, "init", None):
        cfg.train.init = args.init
    if getattr(args, "val", None):
        cfg.finetune.val_data = args.val
    if args.data:
        cfg.data.dataset = args.data
    if args.out:
        cfg.train.out_dir = args.out
    if args.steps is not None:
        cfg.optim.max_steps = args.steps  # validate() refuses 0 or less
    if args.fresh:
        cfg.train.resume = False
    for assignment in args.set:
        cfg.override(assignment)
    return cfg.validate()


def _run_recipe(build: Callable[[], IWMConfig], description: str, argv: Optional[List[str]], run: Callable):
    """Parse the recipe flags, build and override the config, ``run(cfg)``: (exit code, cfg, result), with cfg
    and result None on a failure or on ranks other than 0 (only rank 0 prints the summary)."""
    args = recipe_parser(description).parse_args(argv)
    done = {}

    def go():
        cfg = apply_args(build(), args)
        done["cfg"], done["result"] = cfg, run(cfg)

    code = exit_code_of(go)
    if code or int(os.environ.get("RANK", "0")) != 0:
        return code, None, None
    return code, done["cfg"], done["result"]


def run_recipe(build: Callable[[], IWMConfig], description: str, argv: Optional[List[str]] = None,
               after: Optional[Callable] = None) -> int:
    """Build the recipe's config, apply command-line overrides, pretrain, print where everything is."""
    from engine.eval import chance_mrr
    from engine.pretrain import pretrain

    code, cfg, result = _run_recipe(build, description, argv, pretrain)
    if code or cfg is None:
        return code
    print(f"\nfinal loss {result.final_loss:.4f} (first logged {result.first_loss:.4f}) after {result.step} steps")
    print(f"final MRR {result.mrr:.4f} ({cfg.eval.mrr_candidates} candidates x {cfg.eval.mrr_images} images, chance "
          f"{chance_mrr(cfg.eval.mrr_candidates):.4f}, conditioning={cfg.model.conditioning})")
    if result.data_summary:
        print(f"data:       {result.data_summary}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"logs:       {result.metrics_csv}  (TensorBoard: {os.path.join(result.out_dir, 'tensorboard')})")
    print(f"plot:       {result.plot}")
    if after is not None:
        return exit_code_of(lambda: after(cfg, result))
    return 0


def run_finetune_recipe(build: Callable[[], IWMConfig], description: str, argv: Optional[List[str]] = None) -> int:
    """Build a finetuning recipe's config, apply command-line overrides, finetune, print the accuracy."""
    from engine.finetune import finetune

    code, cfg, result = _run_recipe(build, description, argv, finetune)
    if code or cfg is None:
        return code
    ft = cfg.finetune
    what = ft.protocol + (f" ({ft.predictor_init} predictor)" if ft.protocol in ("predictor", "end_to_end") else "")
    print(f"\n{what} from {ft.checkpoint}: after {result.step} steps")
    for k in ("top1", "top5", "best_top1"):
        if k in result.metrics:
            print(f"{k} {result.metrics[k]:.2f}")
    print(f"checkpoint: {result.checkpoint}  (best: {os.path.join(result.out_dir, 'best.pt')})")
    print(f"logs:       {result.metrics_csv}")
    return 0


def submit_parser() -> argparse.ArgumentParser:
    """``python -m engine.submit``: a recipe on SLURM through submitit (engine/submit.py, docs/cluster.md)."""
    p = argparse.ArgumentParser(prog="python -m engine.submit", description="Submit a recipe to SLURM with "
                                "submitit; it requeues itself when preempted or at its time limit and resumes.")
    p.add_argument("recipe", help="the recipe file, e.g. recipes/pretrain_vith.py; after a lone --, the recipe's "
                                  "own flags (--data, --out, --set ...)")
    p.add_argument("--nodes", type=_positive, default=1)
    p.add_argument("--gpus-per-node", type=_positive, default=8, help="one task (rank) per GPU")
    p.add_argument("--cpus-per-task", type=_positive, default=10, help="data loader workers + the rank itself")
    p.add_argument("--time", type=_positive, default=4320, help="time limit per allocation, minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--signal-delay", type=_positive, default=180,
                   help="seconds before the time limit at which SLURM signals the job (a step and a save must fit)")
    p.add_argument("--folder", default="runs/submitit/%j", help="submitit's logs and job pickles (%%j: job id)")
    p.add_argument("--local", action="store_true", help="submitit's local executor (one node, no SLURM): to try it")
    return p


# ----------------------------------------------------------------------------------------------------
# Evaluation commands
# ----------------------------------------------------------------------------------------------------
def _default_out(ckpt: str, name: str) -> str:
    base = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    return os.path.join(base, name)


def _write_json(args, default_name: str, result: dict) -> str:
    """The command's result as JSON: --out, else ``default_name`` beside the checkpoint; returns the path."""
    out = args.out or _default_out(args.ckpt, default_name)
    atomic_write_json(out, result)
    return out


def _check_train_val(args) -> None:
    if (_folder(args.data) is None) != (_folder(args.val) is None):
        raise DataError("pass both --data TRAIN_DIR and --val VAL_DIR, or neither (embedded data)")


def _folder(arg: Optional[str]) -> Optional[str]:
    return None if arg in (None, "embedded") else arg


def run_mrr(args) -> dict:
    from engine.eval import chance_mrr, load_eval_images, load_model, mrr_interval, reciprocal_rank_per_image
    from engine.monitors import held_out_spatial

    device = torch.device(args.device)
    cfg, model, target, ckpt = load_model(args.ckpt, device)
    if args.candidates:
        cfg.eval.mrr_candidates = args.candidates
    cfg.eval.validate()
    images = load_eval_images(cfg, args.images, split="val", device=device, path=_folder(args.data))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    per_image = reciprocal_rank_per_image(model, target, images, cfg, generator=gen)
    mrr, (lo, hi) = per_image.mean().item(), mrr_interval(per_image)
    result = {"mrr": mrr, "ci95": [lo, hi], "chance": chance_mrr(cfg.eval.mrr_candidates),
              "candidates": cfg.eval.mrr_candidates,
              "images": len(images), "data": args.data or "embedded", "checkpoint": args.ckpt,
              "step": ckpt.get("step"), "conditioning": cfg.model.conditioning}
    result.update(held_out_spatial(model, target, images, cfg, torch.Generator(device=device).manual_seed(args.seed)))
    if args.per_op:
        result["per_op"] = _per_op(model, target, images, cfg, args)
    out = _write_json(args, "mrr.json", result)
    print(f"MRR {mrr:.4f} (95% interval {lo:.4f}-{hi:.4f}) over {len(images)} images x "
          f"{cfg.eval.mrr_candidates} candidates (chance {result['chance']:.4f}); spatial R^2 "
          f"{result['spatial_r2']:.3f}, predictions' spread across positions {result['pred_spread']:.3f}; wrote {out}")
    return result


def _per_op(model, target, images, cfg, args) -> dict:
    from engine.eval import PER_OP_CANDIDATES, equivariance_per_op

    gen = torch.Generator(device=images.device).manual_seed(args.seed)
    per_op = equivariance_per_op(model, target, images[:args.per_op], cfg, generator=gen)
    print(f"per operation ({min(args.per_op, len(images))} images x {PER_OP_CANDIDATES} candidates varying in that "
          f"op only):")
    for op, r in per_op.items():
        print(f"  {op:10s}  MRR {r['mrr']:.3f} (chance {r['chance']:.3f})  R^2 {r['r2']:+.3f}  "
              f"target spread {r['target_spread']:.1f}")
    return per_op


def run_linear(args) -> dict:
    from engine.data import build_loader, check_same_classes
    from engine.eval import eval_dataset, extract_features, linear_probe, load_model, report_data

    device = torch.device(args.device)
    cfg, _, target, ckpt = load_model(args.ckpt, device)
    _check_train_val(args)
    datasets = [eval_dataset(cfg, split, path) for split, path in (("train", _folder(args.data)),
                                                                    ("val", _folder(args.val)))]
    check_same_classes(*datasets, args.data or "embedded", args.val or "embedded")
    loaders = [build_loader(d, args.batch_size, args.workers, shuffle=False, drop_last=False, seed=0)
               for d in datasets]
    tx, ty = extract_features(target, loaders[0], device, desc="train features")
    vx, vy = extract_features(target, loaders[1], device, desc="val features")
    for loader in loaders:
        report_data(loader.dataset)
    result = linear_probe(tx, ty, vx, vy, epochs=args.epochs or cfg.eval.probe_epochs, lr=cfg.eval.probe_lr)
    result.update(checkpoint=args.ckpt, step=ckpt.get("step"), data=args.data or "embedded",
                  val=args.val or "embedded")
    out = _write_json(args, "linear.json", result)
    print(f"linear probe top-1 {result['val_top1']:.2f}% on {result['val_images']} val images "
          f"({result['classes']} classes; train {result['train_top1']:.2f}%); wrote {out}")
    return result


def run_probe(args) -> dict:
    """The paper-protocol probes (linear, attentive): a probe run on the run core, under RUN/probe_<kind>/."""
    from engine.finetune import finetune, probe_config

    kind = args.cmd
    _check_train_val(args)
    run_dir = args.run_dir or _default_out(args.ckpt, f"probe_{kind}")
    cfg = probe_config(args.ckpt, kind, run_dir, data=_folder(args.data), val=_folder(args.val),
                       epochs=args.epochs or 20, batch_size=args.batch_size, lr=args.lr, encoder_weights=args.encoder)
    for assignment in args.set:
        cfg.override(assignment)
    result = finetune(cfg)
    m = result.metrics
    payload = {"protocol": "paper", "probe": kind, "val_top1": m["best_top1"], "final_top1": m["top1"],
               "val_top5": m["top5"], "val_images": int(m["val_images"]), "encoder": args.encoder,
               "checkpoint": args.ckpt, "data": args.data or "embedded", "val": args.val or "embedded",
               "run": run_dir, "steps": result.step}
    out = _write_json(args, f"{kind}.json", payload)
    print(f"{kind} probe ({args.encoder} encoder, {result.step} steps); wrote {out}")
    print(f"top1 {payload['val_top1']:.2f}")
    print(f"top5 {payload['val_top5']:.2f}")
    return payload


def run_linear_any(args) -> dict:
    return run_linear(args) if args.protocol == "quick" else run_probe(args)


def run_finetuned(args) -> dict:
    """Top-1 / top-5 of a finetuned network (a finetuning run's checkpoint.pt / best.pt) on a val folder."""
    from engine.data import build_loader
    from engine.data import check_class_folders
    from engine.eval import eval_dataset
    from engine.finetune import evaluate_classifier, load_finetuned

    device = torch.device(args.device)
    cfg, model, ckpt = load_finetuned(args.ckpt, device)
    val = _folder(args.val)
    check_class_folders(val)
    ds = eval_dataset(cfg, "val", val)
    if list(getattr(ds, "classes", [])) != list(ckpt["classes"]):
        raise DataError(f"{args.val or 'embedded'} has classes {list(getattr(ds, 'classes', []))[:5]}..., the network "
                        f"was finetuned on {ckpt['classes'][:5]}... ({len(ckpt['classes'])}): give a val folder with "
                        f"the same class subfolders")
    loader = build_loader(ds, args.batch_size, args.workers, shuffle=False, drop_last=False, seed=0)
    result = evaluate_classifier(model, loader, device, lambda: torch.autocast("cpu", enabled=False))
    result.update(checkpoint=args.ckpt, protocol=ckpt.get("protocol"), step=ckpt.get("step"),
                  val=args.val or "embedded")
    out = _write_json(args, "finetune_eval.json", result)
    print(f"{ckpt.get('protocol')} finetuned network on {int(result['val_images'])} val images; wrote {out}")
    print(f"top1 {result['top1']:.2f}")
    print(f"top5 {result['top5']:.2f}")
    return result


def run_report(args) -> str:
    from engine.eval.report import report_table

    table = report_table(args.runs)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    print(table)
    return table


def run_imagine(args) -> dict:
    """Named actions on one image: each prediction ranked among real transformed images; PNG + JSON."""
    from engine.world_model import WorldModel, imagine_demo, load_image, save_demo_png

    wm = WorldModel.load(args.ckpt, args.device)
    image = _embedded_image(wm.cfg, args.image) if args.image.startswith("embedded:") else \
        load_image(args.image, wm.cfg.data.img_size)
    demo = imagine_demo(wm, image, random_candidates=args.candidates, seed=args.seed)
    png = args.out or _default_out(args.ckpt, "imagine.png")
    save_demo_png(demo, png, top=args.top)
    result = demo.summary(wm.cfg.views)
    result.update(image=args.image, checkpoint=args.ckpt, step=wm.step, seed=args.seed, png=png)
    out = os.path.splitext(png)[0] + ".json"
    atomic_write_json(out, result)
    for name, a in result["actions"].items():
        print(f"{name:>15}: true target ranked {a['rank']:g} of {result['candidates']} (nearest: {a['nearest']})")
    print(f"mean reciprocal rank {result['mrr']:.3f} (chance {result['chance_mrr']:.3f}); wrote {png} and {out}")
    return result


def _embedded_image(cfg, spec: str) -> torch.Tensor:
    """'embedded:N' -> the N-th image of the embedded val split, [3, S, S] in [0, 1] (centre view)."""
    from engine.data import DataError, to_float_images
    from engine.eval import eval_dataset

    ds = eval_dataset(cfg, "val", "embedded")
    try:
        index = int(spec.split(":", 1)[1])
    except ValueError:
        index = -1
    if not 0 <= index < len(ds):
        raise DataError(f"--image {spec}: use embedded:N with 0 <= N < {len(ds)} (the embedded val images)")
    return to_float_images(ds[index][0][None], "cpu")[0]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _png(text: str) -> str:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text}: give a .png path (the JSON is written beside it)")
    return text


def _parent(*adders: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """A parent parser (``parents=[...]``) holding the arguments the ``adders`` add."""
    parent = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _ckpt_args(p, what: str = "checkpoint.pt, model.safetensors or a run directory") -> None:
    p.add_argument("--ckpt", required=True, help=what)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _train_val_args(p) -> None:
    p.add_argument("--data", default=None, help="train folder with class subfolders; default: embedded")
    p.add_argument("--val", default=None, help="val folder with class subfolders; default: embedded")


def _loader_args(p) -> None:
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--workers", type=int, default=0)


def _out_arg(p, default_name: str) -> None:
    p.add_argument("--out", default=None, help=f"JSON path (default: {default_name} beside the checkpoint)")


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ckpt, train_val, loader = _parent(_ckpt_args), _parent(_train_val_args), _parent(_loader_args)
    p = sub.add_parser("mrr", parents=[ckpt], help="world-model mean reciprocal rank")
    p.add_argument("--data", default=None, help="image folder (class subfolders or flat); default: embedded")
    p.add_argument("--images", type=_positive, default=256, help="images to average over (at most the folder's)")
    p.add_argument("--candidates", type=_positive, default=None, help="candidates per image (default: config, 256)")
    p.add_argument("--seed", type=int, default=0)
    _out_arg(p, "mrr.json")
    p.add_argument("--per-op", type=_positive, default=None, metavar="IMAGES",
                   help="also profile each jitter op alone on this many images: MRR and R^2 (which "
                        "transformations the predictor has learned)")
    p.set_defaults(fn=run_mrr)
    p = sub.add_parser("linear", parents=[ckpt, train_val, loader],
                       help="linear probe on frozen, average-pooled target-encoder features")
    p.add_argument("--epochs", type=_positive, default=None)
    _out_arg(p, "linear.json")
    p.add_argument("--protocol", choices=("quick", "paper"), default="quick",
                   help="quick: full-batch softmax regression on extracted features (a diagnostic); paper: a probe "
                        "run (augmented crops, batch norm + linear, AdamW cosine) on the run core")
    _probe_args(p)
    p.set_defaults(fn=run_linear_any)
    p = sub.add_parser("attentive", parents=[ckpt, train_val, loader],
                       help="attentive probe (one query, one cross-attention block, linear) on the frozen encoder, "
                            "trained as a run")
    p.add_argument("--epochs", type=_positive, default=None, help="probe epochs (default 20)")
    _out_arg(p, "attentive.json")
    _probe_args(p)
    p.set_defaults(fn=run_probe)
    p = sub.add_parser("finetune", parents=[_parent(lambda q: _ckpt_args(
        q, "a finetuning run's folder, checkpoint.pt or best.pt")), train_val, loader],
                       help="top-1 / top-5 of a finetuned network on a val folder (only --val is read)")
    _out_arg(p, "finetune_eval.json")
    p.set_defaults(fn=run_finetuned)
    p = sub.add_parser("report", help="a markdown table of pretraining runs x protocols (top-1 %%) and MRR")
    p.add_argument("runs", nargs="+", help="pretraining and finetuning run directories")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.set_defaults(fn=run_report)
    p = sub.add_parser("imagine", parents=[ckpt],
                       help="the world model as a tool: named actions (brighter, grayscale, ...) on one image, each "
                            "prediction ranked among real transformed images (PNG + JSON)")
    p.add_argument("--image", required=True, help="an image file (resized and centre-cropped to the model's size), "
                                                  "or embedded:N for the N-th embedded val image")
    p.add_argument("--candidates", type=_positive, default=32,
                   help="random jitters of the image added to the named targets as candidates")
    p.add_argument("--top", type=_positive, default=5, help="nearest candidates shown per action")
    p.add_argument("--seed", type=int, default=0, help="seed of the random candidates")
    p.add_argument("--out", type=_png, default=None,
                   help="PNG path (default: imagine.png beside the checkpoint); the JSON goes beside it")
    p.set_defaults(fn=run_imagine)
    return parser


def _probe_args(p) -> None:
    p.add_argument("--lr", type=float, default=1e-3, help="paper-protocol probes: peak LR (AdamW)")
    p.add_argument("--encoder", choices=("target", "context"), default="target",
                   help="paper-protocol probes: features of the target (EMA) or the context encoder")
    p.add_argument("--run-dir", default=None, help="paper-protocol probes: the probe run's folder "
                                                    "(default: probe_<kind>/ beside the checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="paper-protocol probes: override any field of the probe run's config")


def eval_main(argv: Optional[List[str]] = None) -> int:
    args = eval_parser().parse_args(argv)
    return exit_code_of(lambda: args.fn(args))


# ----------------------------------------------------------------------------------------------------
# The memory / time plan (engine/plan)
# ----------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line naming the fix and exit code 2, like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def plan_parser() -> argparse.ArgumentParser:
    from engine import plan

    p = OneLineParser(prog="python -m engine.plan", description=plan.__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a recipe file, e.g. recipes/pretrain_vith.py")
    p.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs in total")
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: the GPU's 80)")
    p.add_argument("--gpu", default="h100", help=f"one of {sorted(plan.GPUS)} (datasheet figures in docs/plan.md)")
    p.add_argument("--gpus-per-node", type=int, default=plan.GPUS_PER_NODE)
    p.add_argument("--mfu", type=float, default=plan.DEFAULT_MFU,
                   help=f"assumed model FLOPs utilisation of the compute (default {plan.DEFAULT_MFU})")
    p.add_argument("--precision", default="autocast",
                   help="autocast (what the engine does on CUDA), ds_bf16 (DeepSpeed bf16 mode) or fp32")
    p.add_argument("--overhead-gib", type=float, default=plan.CUDA_OVERHEAD_GIB,
                   help=f"fixed CUDA context / allocator overhead per GPU (default {plan.CUDA_OVERHEAD_GIB})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    return p


def plan_main(argv: Optional[List[str]] = None) -> int:
    from engine import plan

    args = plan_parser().parse_args(argv)

    def run():
        if args.gpus < 1:
            raise ConfigError(f"--gpus {args.gpus}: need at least one GPU")
        cfg = plan.load_recipe(args.recipe, args.set)
        gpu = args.gpu.lower()
        mem = args.gpu_mem if args.gpu_mem is not None else (plan.GPUS[gpu].mem_gib if gpu in plan.GPUS else 80.0)
        result = plan.plan(cfg, args.gpus, gpu, mem, args.mfu, args.precision, gpus_per_node=args.gpus_per_node,
                           overhead_gib=args.overhead_gib)
        print(plan.format_plan(result))
        if args.json:
            atomic_write_json(args.json, result)
            print(f"wrote {args.json}")

    return exit_code_of(run)


# ----------------------------------------------------------------------------------------------------
# Export: python -m engine.export RUN OUT [--part ...]
# ----------------------------------------------------------------------------------------------------
def run_export(args) -> str:
    from engine.export import export

    name = export(args.run, args.out, args.part)
    print(f"wrote {args.part} of {args.run} to {args.out} (config.json + model.safetensors); load it with "
          f"timm.create_model({name!r}, pretrained=True)"
          + ("  (after `import engine.export`, which registers iwm_predictor)" if args.part == "predictor" else ""))
    return name


def export_parser() -> argparse.ArgumentParser:
    from engine.export import PARTS

    parser = OneLineParser(prog="python -m engine.export",
                                     description="Write a run's encoder (or predictor) as a folder that "
                                                 "timm.create_model('local-dir:OUT', pretrained=True) loads "
                                                 "(the layout of a Hugging Face hub repository).")
    parser.add_argument("run", help="a pretraining run directory, its checkpoint.pt or its model.safetensors")
    parser.add_argument("out", help="the folder to write (new or empty): config.json + model.safetensors")
    parser.add_argument("--part", choices=PARTS, default="target_encoder",
                        help="which network: the EMA target encoder (default: what the paper evaluates), the "
                             "online encoder, or the predictor")
    parser.set_defaults(fn=run_export)
    return parser


def export_main(argv: Optional[List[str]] = None) -> int:
    args = export_parser().parse_args(argv)
    return exit_code_of(lambda: args.fn(args))


# ----------------------------------------------------------------------------------------------------
# Data: python -m engine.data shard IMAGEFOLDER OUT
# ----------------------------------------------------------------------------------------------------
def run_shard(args) -> dict:
    from engine.data.shards import write_shards

    index = write_shards(args.folder, args.out, samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(f"wrote {index['samples']} images of {len(index['classes'])} classes as {len(index['shards'])} shards "
          f"({sum(s['bytes'] for s in index['shards']) / 2**20:.1f} MiB) to {args.out}; "
          f"{index['unreadable_left_out']} unreadable images left out. Train on them with --data {args.out}")
    return index


def data_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m engine.data", description="Data tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("shard", help="write an image folder as WebDataset tar shards (KEY.jpg / KEY.png + KEY.cls)")
    p.add_argument("folder", help="ImageNet-style folder of class subfolders (or a flat folder of images)")
    p.add_argument("out", help="the folder to write (new or empty): shard-NNNNNN.tar + shards.json")
    p.add_argument("--samples-per-shard", type=_positive, default=1000,
                   help="images per shard (1000 ImageNet images are about 110 MiB); each rank reads a run of "
                        "whole shards (but for one at each end), so several shards per rank keep the reads local")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the images are written in")
    p.set_defaults(fn=run_shard)
    return parser


def data_main(argv: Optional[List[str]] = None) -> int:
    args = data_parser().parse_args(argv)
    return exit_code_of(lambda: args.fn(args))
