"""Evaluation: the world model's mean reciprocal rank (MRR) and a linear probe on frozen features.

Command line::

    python -m engine.eval mrr    --ckpt runs/pretrain_tiny/checkpoint.pt [--data DIR] [--out mrr.json]
    python -m engine.eval linear --ckpt runs/pretrain_tiny/checkpoint.pt [--data TRAIN_DIR --val VAL_DIR]

Without ``--data`` both use the embedded data set (its train / val splits).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import atomic_write_json
from engine.config import IWMConfig
from engine.masks import MaskSampler
from engine.models import IWM, Encoder
from engine.views import action_from_params, apply_view, sample_source_params, sample_target_params


# ----------------------------------------------------------------------------------------------------
# MRR (PAPER.md protocol)
# ----------------------------------------------------------------------------------------------------
def reciprocal_ranks(dist: torch.Tensor) -> torch.Tensor:
    """dist [K, K]: distance of prediction j to candidate k; the true candidate of j is k = j.
    Returns 1/rank [K] with rank = 1 + (candidates strictly closer) + half of (other candidates at the
    same distance): ties get the mid-rank, so a candidate that merely equals the truth earns no credit."""
    true = dist.diagonal()[:, None]
    ties = (dist == true).sum(1) - 1
    rank = 1 + (dist < true).sum(1) + 0.5 * ties
    return 1.0 / rank.double()


def latent_reciprocal_ranks(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """preds, targets [K, F]: prediction j is meant to match target j; squared distances in fp64."""
    p, t = preds.double(), targets.double()
    dist = p.pow(2).sum(1, keepdim=True) + t.pow(2).sum(1)[None] - 2 * p @ t.T  # [K, K]
    return reciprocal_ranks(dist)


@torch.no_grad()
def mean_reciprocal_rank(model: IWM, target_encoder: Encoder, images: torch.Tensor, cfg: IWMConfig,
                         generator: Optional[torch.Generator] = None, chunk: int = 64) -> float:
    """For each image I (already cropped, [M, 3, H, W] in [0, 1]): one source view x with its mask and
    K = cfg.eval.mrr_candidates target views y_k of I, each with the colour jitter applied (so no two
    candidates are the same unjittered image). The predictor maps (x, a_{x->y_j}) to p_j; the true
    target latent t_j is ranked among all K candidate latents t_k by mean squared distance over the
    masked positions. MRR = mean of 1/rank over j and images (1: perfect world model; a random ranking
    gives ``chance_mrr(K)``)."""
    device = images.device
    K = cfg.eval.mrr_candidates
    sampler = MaskSampler(cfg.masks, *model.encoder.grid)
    mask_gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator,
                                                               device=generator.device if generator else "cpu")))
    candidate_views = dataclasses.replace(cfg.views, jitter_p=1.0)
    rrs = []
    for img in images:
        img = img[None]
        sp = sample_source_params(cfg.views, 1, generator, device)
        tp = sample_target_params(candidate_views, K, generator, device)
        source = apply_view(img, sp, cfg.views)
        action = action_from_params(sp.repeat_interleave(K), tp)  # [K, A]
        m1 = sampler.sample(1, mask_gen).to(device)
        context = model.encoder(source, m1)  # [Tc, D]
        preds, targets = [], []
        for s in range(0, K, chunk):
            n = min(chunk, K - s)
            mk = m1.repeat(n)
            preds.append(model.predictor(context.repeat(n, 1), mk, action[s:s + n]).float().view(n, -1))
            y = apply_view(img.expand(n, -1, -1, -1), tp.index(slice(s, s + n)), cfg.views)
            feats = target_encoder(y).float()
            feats = F.layer_norm(feats, feats.shape[-1:])
            targets.append(feats[:, m1.target_idx].reshape(n, -1))
        rrs.append(latent_reciprocal_ranks(torch.cat(preds), torch.cat(targets)))  # [K, Tt*D] each
    return torch.cat(rrs).mean().item()


# ----------------------------------------------------------------------------------------------------
# Linear probe on frozen, average-pooled target-encoder features
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: Encoder, loader, device, autocast=contextlib.nullcontext,
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    from tqdm import tqdm

    from engine.data import to_float_images

    encoder.eval()
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        with autocast():
            f = encoder(to_float_images(images, device))  # [B, N, D]
        feats.append(f.float().mean(1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 epochs: int = 100, lr: float = 1e-2, seed: int = 0) -> dict:
    """Softmax regression on standardised features, full batch AdamW; returns top-1 (%) on both splits."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    classes = int(max(train_y.max(), val_y.max())) + 1
    head = nn.Linear(tx.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(head(tx), train_y).backward()
            opt.step()
    with torch.no_grad():
        top1 = lambda x, y: 100.0 * (head(x).argmax(1) == y).float().mean().item()  # noqa: E731
        return {"train_top1": top1(tx, train_y), "val_top1": top1(vx, val_y), "classes": classes,
                "train_images": len(train_y), "val_images": len(val_y)}


# ----------------------------------------------------------------------------------------------------
# Loading a checkpoint and images
# ----------------------------------------------------------------------------------------------------
def load_model(path: str, device) -> Tuple[IWMConfig, IWM, Encoder, dict]:
    from engine.checkpoint import CheckpointError, load_weights

    ckpt = load_weights(path)
    cfg = IWMConfig.from_dict(ckpt["config"])
    model, target = IWM(cfg), Encoder(cfg)
    try:
        model.encoder.load_state_dict(ckpt["encoder"])
        model.predictor.load_state_dict(ckpt["predictor"])
        target.load_state_dict(ckpt["target_encoder"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path!r}: weights do not match the config stored with them ({e})") from None
    return cfg, model.to(device).eval(), target.to(device).eval(), ckpt


def eval_dataset(cfg: IWMConfig, split: str, path: Optional[str] = None):
    from engine.data import build_dataset

    return build_dataset(cfg.data, cfg.views, split=split, path=path, train=False)


def load_eval_images(cfg: IWMConfig, n: int, split: str = "val", device="cpu", path: Optional[str] = None):
    """`n` center-cropped images spread evenly over the data set, as floats in [0, 1] on `device`."""
    from engine.data import to_float_images

    ds = eval_dataset(cfg, split, path)
    n = min(n, len(ds))
    picks = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
    images = to_float_images(torch.stack([ds[i][0] for i in picks]), device)
    report_data(ds)
    return images


def report_data(ds) -> None:
    """For an image folder: how many files were ignored, dropped or substituted (never silent)."""
    if hasattr(ds, "summary"):
        print(f"data: {ds.summary()}")


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _default_out(ckpt: str, name: str) -> str:
    base = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    return os.path.join(base, name)


def run_mrr(args) -> dict:
    from engine.train import chance_mrr

    device = torch.device(args.device)
    cfg, model, target, ckpt = load_model(args.ckpt, device)
    if args.candidates:
        cfg.eval.mrr_candidates = args.candidates
    cfg.eval.validate()
    data = None if args.data in (None, "embedded") else args.data
    images = load_eval_images(cfg, args.images, split="val", device=device, path=data)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    mrr = mean_reciprocal_rank(model, target, images, cfg, generator=gen)
    result = {"mrr": mrr, "chance": chance_mrr(cfg.eval.mrr_candidates), "candidates": cfg.eval.mrr_candidates,
              "images": len(images), "data": args.data or "embedded", "checkpoint": args.ckpt,
              "step": ckpt.get("step"), "conditioning": cfg.model.conditioning}
    out = args.out or _default_out(args.ckpt, "mrr.json")
    atomic_write_json(out, result)
    print(f"MRR {mrr:.4f} over {len(images)} images x {cfg.eval.mrr_candidates} candidates "
          f"(chance {result['chance']:.4f}); wrote {out}")
    return result


def run_linear(args) -> dict:
    from engine.data import DataError, build_loader

    device = torch.device(args.device)
    cfg, _, target, ckpt = load_model(args.ckpt, device)
    if (args.data in (None, "embedded")) != (args.val in (None, "embedded")):
        raise SystemExit("error: pass both --data TRAIN_DIR and --val VAL_DIR, or neither (embedded data)")
    train_path = None if args.data in (None, "embedded") else args.data
    val_path = None if args.val in (None, "embedded") else args.val
    datasets = [eval_dataset(cfg, split, path) for split, path in (("train", train_path), ("val", val_path))]
    classes = [getattr(d, "classes", None) for d in datasets]
    if classes[0] != classes[1]:
        raise DataError(f"train and val folders have different classes ({len(classes[0])} vs {len(classes[1])}; "
                        f"e.g. {sorted(set(classes[0]) ^ set(classes[1]))[:3]}): labels would not line up; "
                        f"give both the same class subfolders")
    if classes[0] is not None and len(classes[0]) < 2:
        raise DataError(f"{args.data}: a linear probe needs at least 2 classes (class subfolders); found "
                        f"{len(classes[0])}")
    loaders = [build_loader(d, args.batch_size, args.workers, shuffle=False, drop_last=False, seed=0)
               for d in datasets]
    tx, ty = extract_features(target, loaders[0], device, desc="train features")
    vx, vy = extract_features(target, loaders[1], device, desc="val features")
    for loader in loaders:
        report_data(loader.dataset)
    result = linear_probe(tx, ty, vx, vy, epochs=args.epochs or cfg.eval.probe_epochs, lr=cfg.eval.probe_lr)
    result.update(checkpoint=args.ckpt, step=ckpt.get("step"), data=args.data or "embedded",
                  val=args.val or "embedded")
    out = args.out or _default_out(args.ckpt, "linear.json")
    atomic_write_json(out, result)
    print(f"linear probe top-1 {result['val_top1']:.2f}% on {result['val_images']} val images "
          f"({result['classes']} classes; train {result['train_top1']:.2f}%); wrote {out}")
    return result


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("mrr", help="world-model mean reciprocal rank")
    p.add_argument("--ckpt", required=True, help="checkpoint.pt or a run directory")
    p.add_argument("--data", default=None, help="image folder (class subfolders or flat); default: embedded")
    p.add_argument("--images", type=_positive, default=16, help="images to average over")
    p.add_argument("--candidates", type=_positive, default=None, help="candidates per image (default: config, 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: mrr.json beside the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(fn=run_mrr)
    p = sub.add_parser("linear", help="linear probe on frozen, average-pooled target-encoder features")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default=None, help="train folder with class subfolders; default: embedded")
    p.add_argument("--val", default=None, help="val folder with class subfolders; default: embedded")
    p.add_argument("--epochs", type=_positive, default=None)
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: linear.json beside the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(fn=run_linear)
    args = parser.parse_args(argv)

    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.data import DataError

    try:
        args.fn(args)
    except (CheckpointError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
