"""Leveraging the world model: the finetuning protocols and the probes, as tasks on the run core.

``finetune(cfg)`` loads a pretraining run's ``checkpoint.pt`` (``cfg.finetune.checkpoint``) and trains one
protocol (``cfg.finetune.protocol``, docs/finetune.md) with :class:`engine.run.Run`, the loop, DeepSpeed
set-up, checkpoints, resume and logs of pretraining:

    encoder      the pretrained encoder + a head (attentive or average-pooled); no predictor
    predictor    the encoder frozen; the predictor runs on its tokens with the identity action and a mask
                 that makes every patch both visible and predicted; an attentive head on its outputs.
                 finetune.predictor_init='random' is the paper's control (a randomly initialised predictor)
    end_to_end   encoder + predictor + attentive head, all trained
    linear       probe: the encoder frozen, average-pooled tokens -> batch norm (no affine) -> linear
    attentive    probe: the encoder frozen, an attentive head

Supervised machinery from timm: label smoothing, mixup / cutmix (``timm.data.Mixup``), RandAugment
(``rand_augment_transform``); layer-wise LR decay as AdamW parameter groups with an ``lr_scale``;
stochastic depth per sample on packed batches (``engine.models.RaggedBlock``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import checkpoint as ckpt_lib
from engine.checkpoint import CheckpointError
from engine.config import ConfigError, IWMConfig
from engine.data import (DataError, _as_input, _to_uint8_tensor, build_dataset, build_loader, check_class_folders,
                         check_same_classes, to_float_images)
from engine.flops import vit_forward_flops
from engine.distributed import gathered
from engine.masks import MaskBatch
from engine.models import Encoder, Predictor
from engine.run import decays
from engine.views import identity_action

log = logging.getLogger("iwm")
KIND = "finetune"  # checkpoint.pt of a finetuning run carries kind='finetune'; a pretraining one has no kind


# ----------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------
# V-JEPA's attentive head draws its weights from N(0, 0.02^2): a per-layer gain of 0.02 * sqrt(fan_in), 0.39 at
# width 384 (the narrowest network of the paper, its ViT-B predictor) but 0.14 at 48. There the first logits are
# about 16x smaller, every gradient passes through several such layers, and a head on a tiny network sits on the
# ln(classes) loss plateau for hundreds of steps; when it leaves depends more on luck than on the features
# (docs/finetune.md, "The head's initialisation"). Layers narrower than 384 get the gain of a 384-wide one.
HEAD_INIT_STD, HEAD_INIT_WIDTH = 0.02, 384


def head_init_std(fan_in: int) -> float:
    """The std of a head weight with `fan_in` inputs: 0.02 from 384 inputs up, 0.02 * sqrt(384 / fan_in) below."""
    return HEAD_INIT_STD * math.sqrt(max(1.0, HEAD_INIT_WIDTH / fan_in))


class AttentiveHead(nn.Module):
    """V-JEPA's attentive classifier: one learned query, one cross-attention block (the query attends to
    the layer-normed tokens; residual; MLP with residual), then a linear layer. tokens [B, N, D] -> [B, C].
    Weights: V-JEPA's N(0, 0.02^2) at widths from 384 up, the same per-layer gain below (`head_init_std`)."""

    def __init__(self, dim: int, heads: int, classes: int, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.layers import Mlp

        if dim % heads:
            raise ConfigError(f"attentive head: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.linear = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.query, std=HEAD_INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=head_init_std(m.in_features))
                nn.init.zeros_(m.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, D]: the query after the cross-attention block."""
        B, N, D = tokens.shape
        h = self.heads
        x = self.norm1(tokens)
        q = self.q(self.query).expand(B, 1, D).reshape(B, 1, h, D // h).transpose(1, 2)  # [B, h, 1, Dh]
        k, v = self.kv(x).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)  # [B, h, N, Dh] each
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        query = self.query + self.proj(attended)
        query = query + self.mlp(self.norm2(query))
        return query[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(tokens))


class PooledHead(nn.Module):
    """Average-pooled tokens -> a norm -> linear. 'layer' (finetuning, MAE's fc_norm) or 'batch' (the linear
    probe: batch norm without affine parameters, MAE's linear-probing protocol)."""

    def __init__(self, dim: int, classes: int, norm: str = "layer"):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm == "layer" else nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01 if norm == "batch" else 2e-5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens.mean(1)))


# ----------------------------------------------------------------------------------------------------
# The predictor as a feature extractor
# ----------------------------------------------------------------------------------------------------
def all_patches_masks(batch: int, grid: tuple, device) -> MaskBatch:
    """The MaskBatch in which every patch of every sample is both visible (context) and predicted (target),
    each sample's patches in raster order."""
    n = grid[0] * grid[1]
    idx = torch.arange(n, device=device).repeat(batch)
    counts = [n] * batch
    return MaskBatch(grid=tuple(grid), context_idx=idx, target_idx=idx, context_counts=counts,
                     target_counts=counts)


def predict_all(predictor: Predictor, tokens: torch.Tensor, action: torch.Tensor, grid: tuple) -> torch.Tensor:
    """The predictor on every position: tokens [B, N, D] (the encoder's, all patches) -> [B, N, D]."""
    B, N, D = tokens.shape
    masks = all_patches_masks(B, grid, tokens.device)
    return predictor(tokens.reshape(B * N, D), masks, action).reshape(B, N, -1)


class FinetuneModel(nn.Module):
    """encoder (trained or frozen) -> [predictor on every position with the identity action] -> head.
    ``forward(images [B, 3, H, W] in [0, 1]) -> logits [B, C]``. A frozen encoder stays in eval mode and
    runs without autograd."""

    def __init__(self, encoder: Encoder, predictor: Optional[Predictor], head: nn.Module, freeze_encoder: bool,
                 views_cfg):
        super().__init__()
        self.encoder, self.predictor, self.head = encoder, predictor, head
        self.freeze_encoder = freeze_encoder
        self.views_cfg = views_cfg
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, D] tokens the head reads."""
        if self.freeze_encoder:
            with torch.no_grad():
                tokens = self.encoder(images)
        else:
            tokens = self.encoder(images)
        if self.predictor is not None:
            action = identity_action(images.shape[0], self.views_cfg, images.device)
            tokens = predict_all(self.predictor, tokens, action, self.encoder.grid)
        return tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_model(cfg: IWMConfig, source: Optional[dict], classes: int) -> FinetuneModel:
    """The protocol's network, its encoder (and predictor) loaded from the pretraining checkpoint ``source``
    (None: left randomly initialised)."""
    ft = cfg.finetune
    encoder = Encoder(cfg)
    uses_predictor = ft.protocol in ("predictor", "end_to_end")
    predictor = Predictor(cfg, encoder.embed_dim, encoder.grid, cfg.views.action_dim) if uses_predictor else None
    if source is not None:
        key = "target_encoder" if ft.encoder_weights == "target" else "encoder"
        _load(encoder, source[key], cfg, key)
        if predictor is not None and ft.predictor_init == "pretrained":
            _load(predictor, source["predictor"], cfg, "predictor")
    dim, _, heads = cfg.model.encoder_dims()
    if ft.protocol == "linear":
        head = PooledHead(dim, classes, norm="batch")
    elif ft.protocol == "encoder" and ft.head == "average":
        head = PooledHead(dim, classes, norm="layer")
    else:
        head = AttentiveHead(dim, heads, classes, cfg.model.mlp_ratio)
    return FinetuneModel(encoder, predictor, head, ft.protocol in ("predictor", "linear", "attentive"), cfg.views)


def _load(module: nn.Module, state: dict, cfg: IWMConfig, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{cfg.finetune.checkpoint!r}: its {what} weights do not fit the model config stored "
                              f"with them ({first}): the file comes from another model; pass the checkpoint.pt "
                              f"its pretraining run wrote") from None


# ----------------------------------------------------------------------------------------------------
# The pretraining checkpoint a finetuning run starts from
# ----------------------------------------------------------------------------------------------------
def load_source(cfg: IWMConfig) -> dict:
    """Load ``cfg.finetune.checkpoint`` (a pretraining checkpoint) and make ``cfg`` describe its network:
    the model section (with model.drop_path = finetune.drop_path), the image size and the views come from it."""
    path = cfg.finetune.checkpoint
    if not path:
        raise ConfigError("finetune.checkpoint is empty: pass the pretraining run to start from, --ckpt RUN_DIR "
                          "(or --set finetune.checkpoint=PATH)")
    source = ckpt_lib.load_weights(path)
    kind = source.get("kind", "pretrain")
    if kind != "pretrain":
        raise CheckpointError(f"{path!r} is a {kind} checkpoint (protocol {source.get('protocol')!r}): finetuning "
                              f"and probes start from a pretraining run's checkpoint.pt")
    pre = IWMConfig.from_dict(source["config"])
    cfg.model = dataclasses.replace(pre.model, drop_path=cfg.finetune.drop_path)
    cfg.data.img_size = pre.data.img_size
    cfg.views = pre.views
    return source


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
class FinetuneTransform:
    """Training transform of the supervised protocols: random resized crop + flip, then timm's RandAugment
    (PIL), uint8 out. Python's ``random`` (which RandAugment draws from) is seeded from torch's stream, so
    the loader's per-sample seeding (``SeededCrops``) makes every sample reproducible on resume."""

    def __init__(self, img_size: int, crop_scale, randaugment: str):
        from timm.data.auto_augment import rand_augment_transform
        from torchvision.transforms import v2

        self.geometry = v2.Compose([v2.RandomResizedCrop((img_size, img_size), scale=tuple(crop_scale),
                                                         antialias=True), v2.RandomHorizontalFlip()])
        self.randaugment = None
        if randaugment:
            try:
                self.randaugment = rand_augment_transform(
                    randaugment, {"translate_const": int(img_size * 0.45), "img_mean": (124, 116, 104)})
            except (AssertionError, ValueError, KeyError) as e:
                raise ConfigError(f"finetune.randaugment={randaugment!r} is not a timm RandAugment spec ({e}): "
                                  f"use e.g. 'rand-m9-mstd0.5-inc1', or '' for none") from None

    def __call__(self, img) -> torch.Tensor:
        img = self.geometry(_as_input(img))
        if self.randaugment is not None:
            state = random.getstate()
            random.seed(int(torch.randint(0, 2 ** 62, (1,))))
            img = self.randaugment(img.convert("RGB"))
            random.setstate(state)
        return _to_uint8_tensor(img)


def val_path_of(cfg: IWMConfig) -> Optional[str]:
    """The labelled val folder: finetune.val_data, else the sibling 'val' of a '.../train' folder (None: the
    embedded val split)."""
    if cfg.finetune.val_data not in ("", "embedded"):
        return cfg.finetune.val_data
    if cfg.data.dataset == "embedded":
        return None
    sibling = os.path.join(os.path.dirname(os.path.normpath(cfg.data.dataset)), "val")
    if os.path.basename(os.path.normpath(cfg.data.dataset)) == "train" and os.path.isdir(sibling):
        return sibling
    raise DataError(f"no val split for {cfg.data.dataset}: pass --val VAL_DIR (finetune.val_data), or use the "
                    f"ImageNet layout .../train and .../val")


# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------
@dataclass
class FinetuneStepOutput:
    loss: torch.Tensor  # fp32 scalar, before backward


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [B, k]
    hit = top == labels[:, None]
    return {k: int(hit[:, :k].any(1).sum()) for k in ks}


class Finetuning:
    """What every protocol shares; a protocol subclass only names itself (and its networks via the config)."""

    name = "finetune"
    protocol = ""
    target_encoder = None  # no EMA encoder here

    def __init__(self, cfg: IWMConfig, device: torch.device, rank: int = 0, source: Optional[dict] = None):
        if cfg.finetune.protocol != self.protocol:
            raise ConfigError(f"{type(self).__name__} runs finetune.protocol={self.protocol!r}, the config says "
                              f"{cfg.finetune.protocol!r}")
        self.cfg, self.device, self.rank = cfg, device, rank
        ft = cfg.finetune
        self.val_path = val_path_of(cfg)
        check_class_folders(None if cfg.data.dataset == "embedded" else cfg.data.dataset)
        check_class_folders(self.val_path)
        self._train = self.train_dataset()
        self._val = build_dataset(cfg.data, cfg.views, split="val", path=self.val_path, train=False)
        self.classes = check_same_classes(self._train, self._val, cfg.data.dataset, self.val_path or "embedded")
        torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
        self.model = build_model(cfg, source, len(self.classes))
        self.mixup = None
        if self.supervised and (ft.mixup > 0 or ft.cutmix > 0) and ft.mix_prob > 0:
            from timm.data import Mixup

            if cfg.data.batch_size % 2:
                raise ConfigError(f"data.batch_size={cfg.data.batch_size}: mixup / cutmix pair each image with "
                                  f"another of its batch, so the batch must be even (or set finetune.mixup=0 "
                                  f"and finetune.cutmix=0)")
            self.mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mix_prob,
                               switch_prob=ft.mix_switch_prob, mode="batch", label_smoothing=ft.label_smoothing,
                               num_classes=len(self.classes))
        self.best = -math.inf
        self.step_done = 0

    @property
    def supervised(self) -> bool:
        """The finetuning protocols use the full supervised machinery; the probes plain crops + CE."""
        return self.protocol in ("encoder", "predictor", "end_to_end")

    # ---- data --------------------------------------------------------------------------------------------
    def train_dataset(self):
        cfg, ft = self.cfg, self.cfg.finetune
        if hasattr(self, "_train"):
            return self._train
        randaugment = ft.randaugment if self.supervised else ""
        transform = FinetuneTransform(cfg.data.img_size, ft.crop_scale, randaugment)
        return build_dataset(cfg.data, cfg.views, split="train", transform=transform)

    def load_eval_data(self) -> None:
        self.val_loader = build_loader(self._val, self.cfg.finetune.eval_batch_size, self.cfg.data.num_workers,
                                       shuffle=False, drop_last=False, seed=0)

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self, engine, images: torch.Tensor, labels: torch.Tensor, autocast: Callable) -> FinetuneStepOutput:
        if self.mixup is not None:
            images, soft = self.mixup(images, labels)  # soft targets, label smoothing included
            with autocast():
                logits = engine(images)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            with autocast():
                logits = engine(images)
            smoothing = self.cfg.finetune.label_smoothing if self.supervised else 0.0
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        return FinetuneStepOutput(loss)

    def after_update(self, step: int, total: int) -> Dict[str, float]:
        self.step_done = step
        return {}

    def tokens(self, out) -> Dict[str, int]:
        return {}

    def step_flops(self, images: int) -> float:
        """Forward of the frozen parts, forward + backward (3x) of the trained ones (engine/flops.py)."""
        cfg, m = self.cfg, self.cfg.model
        dim, depth, _ = m.encoder_dims()
        n = (cfg.data.img_size // m.patch_size) ** 2
        enc = vit_forward_flops(images * n, n, dim, depth, m.mlp_ratio)
        total = enc * (1 if self.model.freeze_encoder else 3)
        if self.model.predictor is not None:
            total += 3 * vit_forward_flops(images * 2 * n, 2 * n, m.predictor_width, m.predictor_depth, m.mlp_ratio)
        return total

    # ---- parameter groups: layer-wise LR decay, the pretrained predictor's LR ------------------------------
    def lr_scale_of(self, name: str) -> float:
        ft = self.cfg.finetune
        _, depth, _ = self.cfg.model.encoder_dims()
        if name.startswith("encoder."):
            if ".blocks." in name:
                layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
            elif ".norm." in name:
                layer = depth + 1
            else:  # patch embedding, positions
                layer = 0
            return ft.layer_decay ** (depth + 1 - layer)
        if name.startswith("predictor."):
            return ft.predictor_lr_scale if ft.predictor_init == "pretrained" else 1.0
        return 1.0  # the head

    def param_groups(self, weight_decay: float) -> List[dict]:
        groups: Dict[tuple, dict] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            decay = decays(name, p)
            scale = self.lr_scale_of(name)
            g = groups.setdefault((scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "apply_wd": decay, "lr_scale": scale})
            g["params"].append(p)
        return list(groups.values())

    # ---- evaluation: top-1 / top-5 on the val split, best checkpoint --------------------------------------
    @torch.no_grad()
    def evaluate(self, module, autocast: Callable) -> Dict[str, float]:
        module.eval()
        result = evaluate_classifier(module, self.val_loader, self.device, autocast)
        module.train()
        if result["top1"] > self.best:
            self.best = result["top1"]
            payload = self.export(module, self.step_done, result)  # under ZeRO-3 every rank evaluates
            if payload is not None:
                ckpt_lib.atomic_save(payload, os.path.join(self.cfg.train.out_dir, "best.pt"))
        return {**result, "best_top1": self.best}

    # ---- checkpoint ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"best": float(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])

    def rng_state(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # mixup / cutmix draw from numpy
        return {"numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
                "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}

    def load_rng_state(self, state: dict) -> None:
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_gauss"]))

    def export(self, module, step: int, metrics: Dict[str, float]) -> Optional[dict]:
        """The finetuned network: what ``python -m engine.eval finetune`` loads (every rank calls it; a gather
        under ZeRO-3; rank 0 gets the payload)."""
        with gathered(module.parameters()):
            if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                return None
            return {"format": ckpt_lib.FORMAT, "kind": KIND, "protocol": self.protocol, "config": self.cfg.to_dict(),
                    "step": step, "classes": list(self.classes),
                    "model": {k: v.detach().clone().cpu() for k, v in module.state_dict().items()},
                    "metrics": {k: float(v) for k, v in (metrics or {}).items()}}


class EncoderFinetuning(Finetuning):
    name, protocol = "finetune_encoder", "encoder"


class PredictorFinetuning(Finetuning):
    name, protocol = "finetune_predictor", "predictor"


class EndToEndFinetuning(Finetuning):
    name, protocol = "finetune_end_to_end", "end_to_end"


class LinearProbe(Finetuning):
    name, protocol = "probe_linear", "linear"


class AttentiveProbe(Finetuning):
    name, protocol = "probe_attentive", "attentive"


TASKS = {t.protocol: t for t in (EncoderFinetuning, PredictorFinetuning, EndToEndFinetuning, LinearProbe,
                                 AttentiveProbe)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device, autocast: Callable) -> Dict[str, float]:
    """top-1 / top-5 accuracy (%) of ``model`` (images -> logits) over ``loader`` (center crops)."""
    correct = {1: 0, 5: 0}
    seen = 0
    for images, labels in loader:
        with autocast():
            logits = model(to_float_images(images, device)).float()
        hits = topk_correct(logits, torch.as_tensor(labels, device=device))
        correct = {k: correct[k] + hits[k] for k in correct}
        seen += len(labels)
    return {"top1": 100.0 * correct[1] / seen, "top5": 100.0 * correct[5] / seen, "val_images": float(seen)}


def finetune(cfg: IWMConfig, dist_info=None):
    """Train ``cfg.finetune.protocol`` from ``cfg.finetune.checkpoint`` in ``cfg.train.out_dir`` (resuming there
    when it holds a checkpoint). Returns the run core's RunResult (metrics: top1, top5, best_top1)."""
    from engine.run import Run, start_process

    cfg.finetune.validate()
    source = load_source(cfg)
    cfg.validate()
    info = start_process(dist_info)
    task = TASKS[cfg.finetune.protocol](cfg, info.device, info.rank, source)
    result = Run(cfg, info).fit(task)
    if info.is_main:
        write_result(cfg, result)
    return result


def load_finetuned(path: str, device) -> tuple:
    """(cfg, FinetuneModel in eval mode, checkpoint) from a finetuning run's checkpoint.pt / best.pt / folder."""
    ckpt = ckpt_lib.load_weights(path)
    if ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path!r} is a pretraining checkpoint: `eval finetune` evaluates a finetuned "
                              f"network; finetune it first (recipes/finetune_*.py --ckpt {path})")
    cfg = IWMConfig.from_dict(ckpt["config"])
    model = build_model(cfg, None, len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path!r}: weights do not match the config stored with them "
                              f"({str(e).splitlines()[0][:200]})") from None
    return cfg, model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------
# Probes from the command line, results files, the report table
# ----------------------------------------------------------------------------------------------------
def probe_config(checkpoint: str, protocol: str, out_dir: str, data: Optional[str] = None,
                 val: Optional[str] = None, epochs: float = 20, batch_size: int = 64, lr: float = 1e-3,
                 encoder_weights: str = "target", seed: int = 0) -> IWMConfig:
    """A probe run (finetune.protocol 'linear' or 'attentive') on the pretraining run's own data settings:
    AdamW, 1 warmup epoch then cosine, random resized crop (0.08-1) + flip, plain cross-entropy."""
    source = ckpt_lib.load_weights(checkpoint)
    cfg = IWMConfig.from_dict(source.get("config", {}))
    cfg.finetune = dataclasses.replace(cfg.finetune, checkpoint=checkpoint, protocol=protocol,
                                       encoder_weights=encoder_weights, val_data=val or "", drop_path=0.0)
    if data is not None:
        cfg.data.dataset = data
    cfg.data.batch_size = batch_size
    cfg.optim = dataclasses.replace(cfg.optim, epochs=epochs, warmup_epochs=min(1.0, epochs / 10), max_steps=None,
                                    start_lr=lr / 10, lr=lr, final_lr=lr / 100, global_batch=None,
                                    weight_decay=0.0 if protocol == "linear" else 0.05,
                                    final_weight_decay=0.0 if protocol == "linear" else 0.05)
    cfg.train = dataclasses.replace(cfg.train, out_dir=out_dir, seed=seed, eval_every=0, resume=False,
                                    ckpt_every=10 ** 9, zero_stage=min(cfg.train.zero_stage, 2))
    return cfg


def write_result(cfg: IWMConfig, result) -> str:
    """``finetune.json`` in the run directory: what ``python -m engine.eval report`` reads."""
    path = os.path.join(cfg.train.out_dir, "finetune.json")
    ckpt_lib.atomic_write_json(path, {
        "protocol": cfg.finetune.protocol, "predictor_init": cfg.finetune.predictor_init,
        "encoder_weights": cfg.finetune.encoder_weights, "source": os.path.abspath(cfg.finetune.checkpoint),
        "step": result.step, **{k: float(v) for k, v in result.metrics.items()}})
    return path


COLUMNS = [("encoder FT", "encoder"), ("frozen enc + random pred", "predictor/random"),
           ("frozen enc + pretrained pred", "predictor/pretrained"), ("end-to-end", "end_to_end"),
           ("linear", "linear"), ("attentive", "attentive"), ("MRR", "mrr")]


def _source_run(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.dirname(path) if path.endswith(".pt") else path


def report_table(runs: List[str]) -> str:
    """A markdown table shaped like the paper's: a row per pretraining run, a column per protocol (top-1 %, the
    best kept checkpoint's) plus MRR. ``runs``: pretraining and finetuning run directories, in any order; a
    finetuning run joins the row of the pretraining run it started from."""
    import json

    rows: Dict[str, Dict[str, float]] = {}
    names: Dict[str, str] = {}

    def read(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    for run in runs:
        if not os.path.isdir(run):
            raise DataError(f"report: {run} is not a run directory")
        ft = read(os.path.join(run, "finetune.json"))
        if ft is not None:
            key = _source_run(ft["source"])
            column = ft["protocol"] + (f"/{ft['predictor_init']}" if ft["protocol"] == "predictor" else "")
            rows.setdefault(key, {})[column] = ft.get("best_top1", ft.get("top1"))
            continue
        key = os.path.abspath(run)
        cfg = read(os.path.join(run, "config.json"))
        if cfg is None and not os.path.isfile(os.path.join(run, "checkpoint.pt")):
            raise DataError(f"report: {run} holds neither a pretraining run (config.json) nor finetune.json")
        names[key] = (cfg or {}).get("name") or os.path.basename(key)
        row = rows.setdefault(key, {})
        for column, file, field in (("mrr", "mrr.json", "mrr"), ("linear", "linear.json", "val_top1"),
                                    ("attentive", "attentive.json", "val_top1")):
            got = read(os.path.join(run, file))
            if got is not None and field in got:
                row.setdefault(column, got[field])
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for key, row in rows.items():
        cells = []
        for _, col in COLUMNS:
            v = row.get(col)
            cells.append("" if v is None else (f"{v:.3f}" if col == "mrr" else f"{v:.1f}"))
        lines.append(f"| {names.get(key, os.path.basename(key))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
