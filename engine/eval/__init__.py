"""Evaluation: the world model's mean reciprocal rank (MRR) and a linear probe on frozen features.

The command line (``python -m engine.eval mrr|linear ...``, ``engine/eval/__main__.py``) is parsed in
``engine/cli.py``; the report table of finetuning runs is ``engine/eval/report.py``; the world model as a tool
(imagine an action's result, retrieve it among images) is ``engine/world_model.py``.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import CheckpointError, load_weights
from engine.config import IWMConfig
from engine.data import build_dataset, to_float_images
from engine.loss import target_tokens
from engine.masks import MaskSampler
from engine.models import IWM, Encoder
from engine.views import mrr_views


# ----------------------------------------------------------------------------------------------------
# MRR (docs/method.md, "MRR")
# ----------------------------------------------------------------------------------------------------
def mid_rank(dist: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """dist [..., K] distances to the candidates, true [..., 1] the true candidate's (one of them) ->
    rank [...] = 1 + (candidates strictly closer) + half of (other candidates at the same distance): ties
    get the mid-rank, so a candidate that merely equals the truth earns no credit."""
    return 1 + (dist < true).sum(-1) + 0.5 * ((dist == true).sum(-1) - 1)


def reciprocal_ranks(dist: torch.Tensor) -> torch.Tensor:
    """dist [K, K]: distance of prediction j to candidate k; the true candidate of j is k = j.
    Returns 1/rank [K] (:func:`mid_rank`)."""
    return 1.0 / mid_rank(dist, dist.diagonal()[:, None]).double()


def latent_reciprocal_ranks(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """preds, targets [K, F]: prediction j is meant to match target j; squared distances in fp64."""
    p, t = preds.double(), targets.double()
    dist = p.pow(2).sum(1, keepdim=True) + t.pow(2).sum(1)[None] - 2 * p @ t.T  # [K, K]
    return reciprocal_ranks(dist)


def chance_mrr(candidates: int) -> float:
    """MRR of a random ranking: the mean of 1/rank over ranks 1..K (H_K / K; 0.0239 for K = 256)."""
    return sum(1.0 / r for r in range(1, candidates + 1)) / candidates


def mean_reciprocal_rank(model: IWM, target_encoder, images: torch.Tensor, cfg: IWMConfig,
                         generator: Optional[torch.Generator] = None, chunk: int = 64) -> float:
    """The MRR over ``images``: the mean of :func:`reciprocal_rank_per_image`."""
    return reciprocal_rank_per_image(model, target_encoder, images, cfg, generator, chunk).mean().item()


def mrr_interval(per_image: torch.Tensor) -> Tuple[float, float]:
    """A 95% interval of the MRR over images (normal approximation: mean +- 1.96 standard errors)."""
    n = per_image.numel()
    half = 1.96 * per_image.double().std().item() / n ** 0.5 if n > 1 else float("nan")
    mean = per_image.double().mean().item()
    return mean - half, mean + half


@torch.no_grad()
def reciprocal_rank_per_image(model: IWM, target_encoder, images: torch.Tensor, cfg: IWMConfig,
                              generator: Optional[torch.Generator] = None, chunk: int = 64) -> torch.Tensor:
    """The world model's MRR (docs/method.md, "MRR") over images [M, 3, H, W] in [0, 1] (already cropped).

    Per image: one source view x with one mask, and K = cfg.eval.mrr_candidates candidate targets y_k with
    their actions a_k (``engine.views.mrr_views``). The predictor maps (x, a_j) to p_j; the true target
    t_j = the training targets of y_j (``engine.loss.target_tokens``: the target encoder's features at the
    masked positions, layer-normed) is ranked among all K candidates' targets by squared distance, ties at
    the mid-rank. MRR = mean of 1/rank over j and images (1: a perfect world model; a predictor that ignores
    the action scores exactly ``chance_mrr(K)``)."""
    rrs = [latent_reciprocal_ranks(p, t).mean()
           for p, t in candidate_latents(model, target_encoder, images, cfg, generator, chunk)]
    return torch.stack(rrs)  # [M]: each image's mean reciprocal rank over its K candidates


@torch.no_grad()
def candidate_latents(model: IWM, target_encoder, images: torch.Tensor, cfg: IWMConfig,
                      generator: Optional[torch.Generator] = None, chunk: int = 64):
    """Yields, per image, (predictions [K, Tt*D], targets [K, Tt*D]) of the MRR protocol above."""
    device = images.device
    K = cfg.eval.mrr_candidates
    eps = cfg.model.target_norm_eps
    sampler = MaskSampler(cfg.masks, *model.encoder.grid)
    mask_gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator,
                                                               device=generator.device if generator else "cpu")))
    for img in images:
        source, candidates, action = mrr_views(img[None], cfg.views, K, generator)  # [1,3,H,W], [K,3,H,W], [K,A]
        m1 = sampler.sample(1, mask_gen).to(device)
        context = model.encoder(source, m1)  # [Tc, D]
        preds, targets = [], []
        for s in range(0, K, chunk):
            n = min(chunk, K - s)
            mk = m1.repeat(n)
            preds.append(model.predictor(context.repeat(n, 1), mk, action[s:s + n]).float().view(n, -1))
            targets.append(target_tokens(target_encoder(candidates[s:s + n]), mk, eps).view(n, -1))
        yield torch.cat(preds), torch.cat(targets)


def explained_variation(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """R^2 of predictions over candidates: 1 - sum ||(p_k - mean p) - (t_k - mean t)||^2 / sum ||t_k - mean t||^2,
    the share of the targets' variation across actions that the predictions follow (1: all of it; 0 or less:
    none, e.g. a predictor that ignores the action)."""
    p, t = preds.double(), targets.double()
    pc, tc = p - p.mean(0), t - t.mean(0)
    return 1.0 - ((pc - tc).pow(2).sum() / tc.pow(2).sum()).item()


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
PER_OP_CANDIDATES = 64  # candidates per image in `equivariance_per_op` (and `engine.eval mrr --per-op`)


@torch.no_grad()
def equivariance_per_op(model: IWM, target_encoder, images: torch.Tensor, cfg: IWMConfig,
                        candidates: int = PER_OP_CANDIDATES,
                        generator: Optional[torch.Generator] = None) -> dict:
    """Which transformations the world model has learned: the MRR protocol with the candidates varying in one
    jitter op at a time (its configured strength, the other three at 0, no destructive op), then all together.
    Per op: MRR over ``candidates``, its chance, R^2 (:func:`explained_variation`, mean over images) and the
    targets' spread (mean squared distance of a candidate's targets to their mean: how much the op moves the
    target features at all). Ops with strength 0 are left out."""
    quiet = dict(blur_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    out = {}
    for op in JITTER_OPS + ("all",):
        if op != "all" and getattr(cfg.views, op) == 0:
            continue
        only = {o: 0.0 for o in JITTER_OPS if o != op} if op != "all" else {}
        c = replace(cfg, views=replace(cfg.views, **quiet, **only), eval=replace(cfg.eval, mrr_candidates=candidates))
        rr, r2, spread = [], [], []
        for p, t in candidate_latents(model, target_encoder, images, c, generator):
            rr.append(latent_reciprocal_ranks(p, t).mean().item())
            r2.append(explained_variation(p, t))
            spread.append((t.double() - t.double().mean(0)).pow(2).sum(1).mean().item())
        n = len(rr)
        out[op] = {"mrr": sum(rr) / n, "chance": chance_mrr(candidates), "r2": sum(r2) / n,
                   "target_spread": sum(spread) / n}
    return out


# ----------------------------------------------------------------------------------------------------
# Linear probe on frozen, average-pooled target-encoder features
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: Encoder, loader, device, autocast=contextlib.nullcontext,
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    from tqdm import tqdm

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
    return build_dataset(cfg.data, cfg.views, split=split, path=path, train=False)


def load_eval_images(cfg: IWMConfig, n: int, split: str = "val", device="cpu", path: Optional[str] = None):
    """`n` center-cropped images spread evenly over the data set, as floats in [0, 1] on `device`."""
    ds = eval_dataset(cfg, split, path)
    n = min(n, len(ds))
    picks = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
    images = to_float_images(torch.stack([ds[i][0] for i in picks]), device)
    report_data(ds)
    return images


def report_data(ds) -> None:
    """How many images; for an image folder also how many files were ignored, dropped or substituted."""
    print(f"data: {ds.summary()}")

