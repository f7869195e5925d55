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
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import checkpoint as ckpt_lib
from engine.checkpoint import CheckpointError
from engine.config import ConfigError, IWMConfig
from engine.data import (FinetuneTransform, build_dataset, build_loader, check_class_folders, check_same_classes,
                         to_float_images, val_path_of)
from engine.distributed import gathered
from engine.eval.report import write_result
from engine.flops import vit_forward_flops
from engine.heads import AttentiveHead, PooledHead
from engine.models import Encoder, Predictor, predict_all
from engine.run import decays
from engine.views import identity_action

log = logging.getLogger("iwm")
KIND = "finetune"  # checkpoint.pt of a finetuning run carries kind='finetune'; a pretraining one has no kind


@dataclass(frozen=True)
class Protocol:
    """What sets one protocol apart from the others (everything else is :class:`Finetuning`'s)."""
    name: str              # the run's task name, in its logs
    supervised: bool       # the supervised machinery: RandAugment, mixup / cutmix, label smoothing
    freeze_encoder: bool   # the encoder frozen (eval mode, no autograd)
    uses_predictor: bool   # the predictor on every position (identity action) between encoder and head
    head: str              # 'attentive', 'batch' (pooled + batch norm: the linear probe) or 'config' (finetune.head)


PROTOCOLS: Dict[str, Protocol] = {
    "encoder": Protocol("finetune_encoder", supervised=True, freeze_encoder=False, uses_predictor=False,
                        head="config"),
    "predictor": Protocol("finetune_predictor", supervised=True, freeze_encoder=True, uses_predictor=True,
                          head="attentive"),
    "end_to_end": Protocol("finetune_end_to_end", supervised=True, freeze_encoder=False, uses_predictor=True,
                           head="attentive"),
    "linear": Protocol("probe_linear", supervised=False, freeze_encoder=True, uses_predictor=False, head="batch"),
    "attentive": Protocol("probe_attentive", supervised=False, freeze_encoder=True, uses_predictor=False,
                          head="attentive"),
}


# ----------------------------------------------------------------------------------------------------
# The predictor as a feature extractor
# ----------------------------------------------------------------------------------------------------
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
    spec = PROTOCOLS[ft.protocol]
    encoder = Encoder(cfg)
    predictor = Predictor(cfg, encoder.embed_dim, encoder.grid, cfg.views.action_dim) if spec.uses_predictor else None
    if source is not None:
        key = "target_encoder" if ft.encoder_weights == "target" else "encoder"
        _load(encoder, source[key], cfg, key)
        if predictor is not None and ft.predictor_init == "pretrained":
            _load(predictor, source["predictor"], cfg, "predictor")
    dim, _, heads = cfg.model.encoder_dims()
    kind = ft.head if spec.head == "config" else spec.head
    if kind == "batch":
        head = PooledHead(dim, classes, norm="batch")
    elif kind == "average":
        head = PooledHead(dim, classes, norm="layer")
    else:
        head = AttentiveHead(dim, heads, classes, cfg.model.mlp_ratio)
    return FinetuneModel(encoder, predictor, head, spec.freeze_encoder, cfg.views)


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


def init_source(cfg: IWMConfig):
    """``train.init`` read (engine.warm_start); a file of ours also gives the network (model section, image
    size, views) as :func:`load_source` does, an I-JEPA file leaves the recipe's. finetune.checkpoint becomes
    the init path (what the run's records name as its source)."""
    from engine.warm_start import read_weights

    source = read_weights(cfg.train.init)
    if source.config is not None:
        pre = IWMConfig.from_dict(source.config)
        cfg.model = dataclasses.replace(pre.model, drop_path=cfg.finetune.drop_path)
        cfg.data.img_size = pre.data.img_size
        cfg.views = pre.views
    else:
        cfg.model.drop_path = cfg.finetune.drop_path
    cfg.finetune.checkpoint = cfg.train.init
    return source


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
    """Every protocol as a task on the run core; :data:`PROTOCOLS` says how they differ."""

    target_encoder = None  # no EMA encoder here
    chance = None          # no MRR chance line on the plot

    def __init__(self, cfg: IWMConfig, device: torch.device, rank: int = 0, source: Optional[dict] = None):
        self.cfg, self.device, self.rank = cfg, device, rank
        ft = cfg.finetune
        self.protocol = ft.protocol
        self.spec = PROTOCOLS[ft.protocol]
        self.name = self.spec.name
        self.supervised = self.spec.supervised
        self.val_path = val_path_of(cfg)
        check_class_folders(None if cfg.data.dataset == "embedded" else cfg.data.dataset)
        check_class_folders(self.val_path)
        randaugment = ft.randaugment if self.supervised else ""
        self._train = build_dataset(cfg.data, cfg.views, split="train",
                                    transform=FinetuneTransform(cfg.data.img_size, ft.crop_scale, randaugment))
        self._val = build_dataset(cfg.data, cfg.views, split="val", path=self.val_path, train=False)
        self.classes = check_same_classes(self._train, self._val, cfg.data.dataset, self.val_path or "embedded")
        torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
        self.model = build_model(cfg, source, len(self.classes))
        self.mixup = self._mixup()
        self.best = -math.inf
        self.step_done = 0

    def _mixup(self):
        """timm's Mixup for the supervised protocols when mixup or cutmix is on, else None."""
        cfg, ft = self.cfg, self.cfg.finetune
        if not (self.supervised and (ft.mixup > 0 or ft.cutmix > 0) and ft.mix_prob > 0):
            return None
        from timm.data import Mixup

        if cfg.data.batch_size % 2:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size}: mixup / cutmix pair each image with "
                              f"another of its batch, so the batch must be even (or set finetune.mixup=0 "
                              f"and finetune.cutmix=0)")
        return Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mix_prob, switch_prob=ft.mix_switch_prob,
                     mode="batch", label_smoothing=ft.label_smoothing, num_classes=len(self.classes))

    # ---- data --------------------------------------------------------------------------------------------
    def train_dataset(self):
        """The labelled training set: random resized crop + flip (+ RandAugment for the supervised protocols)."""
        return self._train

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

    def monitors(self, module, autocast: Callable) -> Dict[str, float]:
        """No collapse monitors: the labels' loss cannot collapse the way a self-supervised target can."""
        return {}

    def tokens(self, out) -> Dict[str, int]:
        return {}  # every patch, every image: step_flops counts them from the image count

    def external_parameters(self) -> List[tuple]:
        return []

    def step_flops(self, images: int, tokens: Dict[str, int]) -> float:
        """Forward of the frozen parts, forward + backward (3x) of the trained ones (engine/flops.py); every
        patch is a token here, so ``tokens`` is not needed."""
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

    def reseed(self, step: int) -> None:
        """numpy's stream (mixup / cutmix) restarted at ``step`` (a resume on another number of ranks)."""
        np.random.seed(ckpt_lib.reseed_value(self.cfg.train.seed, step, self.rank) % 2 ** 32)

    def warm_start(self, source) -> List[str]:
        """The network from ``source`` (an engine.warm_start.WeightsSource): the encoder from its target
        encoder or online encoder (finetune.encoder_weights), the predictor unless finetune.predictor_init is
        'random', the head from a finetuned network's file (else left at its initialisation)."""
        from engine.warm_start import warm_start

        m, ft = self.model, self.cfg.finetune
        encoder = ("target_encoder", "encoder") if ft.encoder_weights == "target" else ("encoder",)
        parts = {"encoder": m.encoder, "head": m.head}
        if m.predictor is not None and ft.predictor_init == "pretrained":
            parts["predictor"] = m.predictor
        return warm_start(parts, source, aliases={"encoder": encoder})

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
    init = None
    if cfg.train.init:  # a warm start: the network from any weights file, loaded part by part by the run
        init = init_source(cfg)
        source = None
    else:
        source = load_source(cfg)
    cfg.validate()
    info = start_process(dist_info)
    task = Finetuning(cfg, info.device, info.rank, source)
    result = Run(cfg, info).fit(task, init=init)
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
