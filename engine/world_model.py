"""The world model as a tool: imagine what an action does to an image, in latent space, and find it.

    wm = WorldModel.load("runs/pretrain_tiny", device="cpu")
    ex = named_action(image, "brighter", wm.cfg.views)        # source x, true target y, action a_{x->y}
    pred = wm.imagine(ex.source, ex.action)                   # [N, D]: the predicted latent of y
    ranking = wm.retrieve(pred, torch.stack([ex.target, other_image]))   # nearest first

The relation is the training one (``engine/views.py``, docs/method.md "Views and the action"): y = J_y(I),
x = D(J_x(y)), a = (J_x^{-1}, D), so the action says how to get the target y back from the source x.
:func:`imagine` runs the online encoder on x (every patch visible) and the predictor with the action at
every patch (every patch predicted, ``engine.masks.all_patches_masks``), and layer-normalises each
token as the training targets are (``engine.loss``), so a prediction is comparable with
:func:`encode_target` of an image (the target encoder's features, the regression targets of training).

Named actions (:func:`named_action`) are built from the views code itself: the source's parameters J_x and
D as a :class:`engine.views.ViewParams`, the action from ``action_from_params``, the source from
``apply_destructive`` and the true target from ``apply_jitter`` of J_x^{-1}. "brighter" is an action whose
J_x^{-1} brightness factor is above 1 (the source was darkened by J_x): the target is the image made
brighter. "grayscale" says the source was grayscaled: the source is the grayscaled image and the target the
colour one. Magnitudes are a fraction (``strength``) of the config's jitter range, inside what training saw.

The command line: ``python -m engine.eval imagine --ckpt RUN --image FILE`` (``engine/cli.py``,
:func:`imagine_demo`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from engine.config import IWMConfig, ViewConfig
from engine.eval import chance_mrr, load_model, mid_rank
from engine.masks import all_patches_masks
from engine.loss import target_tokens
from engine.models import Encoder, Predictor
from engine.views import (ViewParams, action_from_params, apply_destructive, apply_jitter, inverse_jitter,
                          inverse_jitter_views)


# ----------------------------------------------------------------------------------------------------
# Ranking candidates by distance to a latent
# ----------------------------------------------------------------------------------------------------
class Ranking(NamedTuple):
    """``order`` [..., K]: candidate indices, nearest first (ties keep candidate order); ``distance``
    [..., K] fp64: the squared L2 distance of candidate k (in candidate order, not sorted)."""

    order: torch.Tensor
    distance: torch.Tensor

    def rank_of(self, k: int) -> float:
        """1-based rank of candidate k (one query): 1 + the candidates strictly closer + half of the others
        at the same distance (the MRR's mid-rank rule, ``engine.eval.mid_rank``)."""
        d = self.distance
        if d.dim() != 1:
            raise ValueError(f"rank_of needs one query's ranking, got distances {tuple(d.shape)}")
        return float(mid_rank(d, d[k:k + 1]))


def rank_latents(latent: torch.Tensor, candidates: torch.Tensor) -> Ranking:
    """latent [N, D] (one query) or [B, N, D], candidates [K, N, D] -> :class:`Ranking` by squared distance
    summed over positions and channels, in fp64."""
    if candidates.dim() != 3:
        raise ValueError(f"candidate latents must be [K, N, D], got {tuple(candidates.shape)}")
    single = latent.dim() == 2
    q = latent[None] if single else latent
    if q.dim() != 3 or q.shape[1:] != candidates.shape[1:]:
        raise ValueError(f"latent {tuple(latent.shape)} does not match candidates {tuple(candidates.shape)}: "
                         f"both need the same [N, D]")
    c = candidates.double().to(q.device)
    dist = torch.stack([(c - p.double()).pow(2).sum(dim=(1, 2)) for p in q])  # [B, K]
    order = dist.sort(dim=1, stable=True).indices
    return Ranking(order[0], dist[0]) if single else Ranking(order, dist)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
@dataclass
class WorldModel:
    """A pretrained IWM as a tool: online encoder, predictor, target encoder and their config, in eval mode."""

    cfg: IWMConfig
    encoder: Encoder
    predictor: Predictor
    target_encoder: Encoder
    step: Optional[int] = None

    @classmethod
    def load(cls, path: str, device="cpu") -> "WorldModel":
        """From a checkpoint.pt or a run directory (``engine.eval.load_model``; a bad file raises
        ``CheckpointError``)."""
        cfg, model, target, ckpt = load_model(path, torch.device(device))
        return cls(cfg, model.encoder, model.predictor, target, ckpt.get("step"))

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def eps(self) -> float:
        return self.cfg.model.target_norm_eps

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        x = images[None] if images.dim() == 3 else images
        size = self.cfg.data.img_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}] (or one [3, {size}, {size}]) in [0, 1], the "
                             f"model's data.img_size; got {tuple(images.shape)}")
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def imagine(self, image: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The predicted latent of the target y = a(x) at every patch, layer-normed per token.

        image: x [B, 3, H, W] in [0, 1] (or one [3, H, W]); action: [B, cfg.views.action_dim] (or one
        [action_dim]; the layout is ``ViewConfig.action_columns``). Returns [B, N, D] (or [N, D])."""
        single = image.dim() == 3
        x = self._images(image)
        a = (action[None] if action.dim() == 1 else action).to(self.device, torch.float32)
        A = self.cfg.views.action_dim
        if a.shape != (x.shape[0], A):
            raise ValueError(f"action must be [{x.shape[0]}, {A}] for {x.shape[0]} image(s) (columns "
                             f"{', '.join(self.cfg.views.action_columns)}), got {tuple(action.shape)}")
        B, N = x.shape[0], self.encoder.num_patches
        masks = all_patches_masks(B, self.encoder.grid, self.device)
        pred = self.predictor(self.encoder(x, masks), masks, a).float()  # [B * N, D]
        out = F.layer_norm(pred, (pred.shape[-1],), eps=self.eps).view(B, N, -1)
        return out[0] if single else out

    @torch.no_grad()
    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        """The training targets of whole images: target encoder, layer-normed per token. [B, 3, H, W] (or
        [3, H, W]) in [0, 1] -> [B, N, D] (or [N, D]) fp32."""
        single = images.dim() == 3
        x = self._images(images)
        feats = self.target_encoder(x)  # [B, N, D]
        B, N, D = feats.shape
        out = target_tokens(feats, all_patches_masks(B, self.encoder.grid, self.device), self.eps).view(B, N, D)
        return out[0] if single else out

    def retrieve(self, latent: torch.Tensor, candidates: torch.Tensor, chunk: int = 64) -> Ranking:
        """Rank candidates by squared distance to ``latent`` ([N, D] or [B, N, D]); candidates are latents
        [K, N, D] or images [K, 3, H, W] (encoded with :meth:`encode_target`, ``chunk`` at a time)."""
        if candidates.dim() == 4:
            candidates = torch.cat([self.encode_target(candidates[s:s + chunk])
                                    for s in range(0, candidates.shape[0], chunk)])
        return rank_latents(latent, candidates)


# ----------------------------------------------------------------------------------------------------
# Named actions, built with the views code
# ----------------------------------------------------------------------------------------------------
# name -> (the jitter op: its ViewConfig range and ViewParams field, the sign of J_x^{-1}'s change);
# None: a destructive op
NAMED_ACTIONS = {
    "brighter": ("brightness", +1), "darker": ("brightness", -1),
    "more contrast": ("contrast", +1), "less contrast": ("contrast", -1),
    "more saturated": ("saturation", +1), "less saturated": ("saturation", -1),
    "hue +": ("hue", +1), "hue -": ("hue", -1),
    "grayscale": None,
}
DEMO_ACTIONS = ("brighter", "darker", "more saturated", "less saturated", "hue +", "hue -", "grayscale")


@dataclass
class NamedAction:
    name: str
    source: torch.Tensor  # x [3, H, W]: what the world model sees
    target: torch.Tensor  # y [3, H, W]: the true result of the action on x
    action: torch.Tensor  # a_{x->y} [action_dim]
    params: ViewParams  # J_x and D of the source (batch 1): the action is action_from_params(params)


def source_params(name: str, cfg: ViewConfig, strength: float = 0.85) -> ViewParams:
    """J_x and D (one sample) whose action does ``name``: J_x^{-1}'s factor is 1 / (1 -+ strength * v) for
    a factor op of range v (above 1 for brighter / more ..., below for darker / less ...), its hue +-
    strength * cfg.hue; jitter ops in the canonical order. "grayscale": no jitter, the grayscale flag."""
    if name not in NAMED_ACTIONS:
        raise ValueError(f"unknown action {name!r}: use one of {', '.join(NAMED_ACTIONS)}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength}: a fraction of the config's jitter range, in (0, 1]")
    one, zero, no = torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool)
    jitter = dict(brightness=one, contrast=one.clone(), saturation=one.clone(), hue=zero)
    applied, gray = no, no.clone()
    spec = NAMED_ACTIONS[name]
    if spec is None:
        gray = torch.ones(1, dtype=torch.bool)
    else:
        field, sign = spec
        v = strength * getattr(cfg, field)
        # J_x is the opposite change: J_x^{-1} = 1 / J_x's factor, -J_x's hue
        jitter[field] = torch.tensor([-sign * v]) if field == "hue" else torch.tensor([1.0 - sign * v])
        applied = torch.ones(1, dtype=torch.bool)
    return ViewParams(applied, order=torch.arange(4)[None], blur_applied=no.clone(), blur_sigma=zero.clone(),
                      grayscale=gray, solarize=no.clone(), **jitter)


def named_action(image: torch.Tensor, name: str, cfg: ViewConfig, strength: float = 0.85) -> NamedAction:
    """The example for ``name`` on an image [3, H, W] (or [1, 3, H, W]) in [0, 1]: source x = D(I), true
    target y = J_x^{-1}(I) (exact inverse of J_x wherever J_x^{-1} does not clamp, so J_x(y) = I there and
    x = D(J_x(y)), the training relation), action = action_from_params(J_x, D)."""
    img = (image[None] if image.dim() == 3 else image).float()
    p = source_params(name, cfg, strength)
    source = apply_destructive(img, p, cfg)
    target = apply_jitter(img, inverse_jitter(p))
    return NamedAction(name, source[0], target[0], action_from_params(p, cfg)[0], p)


def named_actions(image: torch.Tensor, cfg: ViewConfig, names: Sequence[str] = DEMO_ACTIONS,
                  strength: float = 0.85) -> List[NamedAction]:
    """:func:`named_action` for each name, skipping jitter ops whose config range is 0 (never seen in
    training, and their target would be the image itself)."""
    for n in names:
        if n not in NAMED_ACTIONS:
            raise ValueError(f"unknown action {n!r}: use one of {', '.join(NAMED_ACTIONS)}")
    seen = [n for n in names if NAMED_ACTIONS[n] is None or getattr(cfg, NAMED_ACTIONS[n][0]) > 0]
    return [named_action(image, n, cfg, strength) for n in seen]


def random_targets(image: torch.Tensor, cfg: ViewConfig, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random targets of one image [3, H, W]: J_k^{-1}(I) for jitters J_k drawn from the config
    (always applied), as the MRR's candidates are (``engine.views.mrr_views``). -> [count, 3, H, W]."""
    return inverse_jitter_views(image[None].float(), cfg, count, generator)[1]


# ----------------------------------------------------------------------------------------------------
# The demo: named actions on one image, each prediction ranked among real transformed images
# ----------------------------------------------------------------------------------------------------
def load_image(path: str, img_size: int) -> torch.Tensor:
    """One image file -> [3, img_size, img_size] float in [0, 1]: shorter side resized to img_size, centre
    crop. A missing or unreadable file raises ``DataError`` (one line)."""
    import os

    from PIL import Image

    from engine.data import DataError, EvalTransform, to_rgb8

    if not os.path.isfile(path):
        raise DataError(f"image file does not exist: {path}: pass --image with a PNG / JPEG file")
    try:
        with Image.open(path) as im:
            rgb = to_rgb8(im)
    except Exception as e:  # PIL raises many types for files it cannot read
        raise DataError(f"cannot read {path} as an image ({type(e).__name__}): pass --image with a PNG / JPEG "
                        f"file") from None
    return EvalTransform(img_size, 1.0)(rgb).float() / 255.0


@dataclass
class Demo:
    examples: List[NamedAction]  # one per row
    pool: torch.Tensor  # [C, 3, H, W] candidates: the examples' targets (row r's is candidate r), then random
    labels: List[str]  # [C] what each candidate is: an action's name, "original", "random jitter"
    ranking: Ranking  # order, distance [R, C]: each row's prediction against the pool

    def rank(self, row: int) -> float:
        return Ranking(self.ranking.order[row], self.ranking.distance[row]).rank_of(row)

    def summary(self, cfg: ViewConfig) -> Dict:
        C = len(self.labels)
        actions = {}  # (v + 0.0: no -0.0 in the JSON)
        for r, ex in enumerate(self.examples):
            d = self.ranking.distance[r]
            actions[ex.name] = {"rank": self.rank(r), "distance": d[r].item(), "nearest_distance": d.min().item(),
                                "nearest": self.labels[int(self.ranking.order[r, 0])],
                                "action": dict(zip(cfg.action_columns, (v + 0.0 for v in ex.action.tolist())))}
        mrr = sum(1.0 / a["rank"] for a in actions.values()) / max(1, len(actions))
        return {"actions": actions, "candidates": C, "random_candidates": C - len(self.examples),
                "mrr": mrr, "chance_rank": (C + 1) / 2, "chance_mrr": chance_mrr(C)}


def imagine_demo(wm: WorldModel, image: torch.Tensor, random_candidates: int = 32, seed: int = 0,
                 names: Sequence[str] = DEMO_ACTIONS, strength: float = 0.85) -> Demo:
    """Each named action on ``image`` [3, H, W]: the prediction from (x, a) is ranked among the pool of real
    images: every example's true target plus ``random_candidates`` random targets of the image."""
    image = wm._images(image)[0]
    examples = named_actions(image, wm.cfg.views, names, strength)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.cat([torch.stack([e.target for e in examples]),
                      random_targets(image, wm.cfg.views, random_candidates, gen)])
    preds = wm.imagine(torch.stack([e.source for e in examples]), torch.stack([e.action for e in examples]))
    # a destructive-only action's target is the image itself
    labels = [e.name if NAMED_ACTIONS[e.name] else "original" for e in examples] + ["random jitter"] * random_candidates
    return Demo(examples, pool, labels, wm.retrieve(preds, pool))


def save_demo_png(demo: Demo, path: str, top: int = 5, title: str = "") -> str:
    """One row per action: the source x, the true target y (its rank in the title), then the ``top``
    candidates nearest to the prediction, the true one outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.checkpoint import atomic_write

    R, C = len(demo.examples), len(demo.labels)
    top = min(top, C)
    fig, axes = plt.subplots(R, 2 + top, figsize=(1.6 * (2 + top), 1.75 * R + 0.5), squeeze=False)
    for r, ex in enumerate(demo.examples):
        order = demo.ranking.order[r].tolist()
        cells = [(ex.source, f"source: {ex.name}", False), (ex.target, f"true: rank {demo.rank(r):g}/{C}", False)]
        cells += [(demo.pool[k], f"#{j + 1} {demo.labels[k]}", k == r) for j, k in enumerate(order[:top])]
        for ax, (img, label, outline) in zip(axes[r], cells):
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_title(label, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(outline)
                spine.set_color("limegreen")
                spine.set_linewidth(3)
    fig.suptitle(title or f"imagined by the predictor, retrieved among {C} real images (true outlined)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path
