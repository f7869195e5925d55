"""Typed configuration: the one source of truth for every default.

A recipe (``recipes/*.py``) builds an :class:`IWMConfig`, changes what it needs and calls the engine.
Defaults follow the method (docs/method.md: Garrido et al. 2024, with I-JEPA defaults where the paper is silent).
Any field can be overridden from the command line with ``--set section.field=value``.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------------
# Views: the shared crop + flip, the target jitter, the source jitter + destructive transforms.
# ----------------------------------------------------------------------------------------------------
@dataclass
class ViewConfig:
    # geometry shared by source and target view (applied in the loader, per image)
    crop_scale: Tuple[float, float] = (0.3, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    # colour jitter: the target y = J_y(I) and the source's further jitter J_x(y) (docs/method.md)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    # 'random': the four jitter ops run in a random order per sample (as torchvision's ColorJitter; the
    # paper does not say) and the action encodes the order; 'fixed': always brightness, contrast,
    # saturation, hue, and the action has no order columns.
    jitter_order: str = "random"
    # destructive transforms, source view only, after its jitter
    blur_p: float = 0.2
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    grayscale_p: float = 0.2
    solarize_p: float = 0.1
    solarize_threshold: float = 0.5

    @property
    def action_columns(self) -> Tuple[str, ...]:
        """The action's columns (engine/views.py): the inverse of the source's jitter (factors, hue and,
        for a random order, each op's step in it / 3), then the source's destructive ops."""
        order = (("rank_brightness", "rank_contrast", "rank_saturation", "rank_hue")
                 if self.jitter_order == "random" else ())
        return (("brightness", "contrast", "saturation", "hue") + order
                + ("blur", "blur_sigma", "grayscale", "solarize"))

    @property
    def action_dim(self) -> int:
        """The one definition of the action's width: 12 with jitter_order 'random', 8 with 'fixed'."""
        return len(self.action_columns)

    def validate(self) -> None:
        for name in ("hflip_p", "jitter_p", "blur_p", "grayscale_p", "solarize_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"views.{name}={v} is a probability: use a value in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"views.{name}={v}: the jitter factor is drawn from [1-v, 1+v]; use 0 <= v < 1")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"views.hue={self.hue}: hue shift must be in [0, 0.5]")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"views.crop_scale={self.crop_scale}: need 0 < min <= max <= 1")
        if self.jitter_order not in ("random", "fixed"):
            raise ConfigError(f"views.jitter_order={self.jitter_order!r}: use 'random' or 'fixed'")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ConfigError(f"views.blur_sigma={self.blur_sigma}: need 0 < min <= max")


def strong_jitter() -> ViewConfig:
    """The 'strong jitter' ablation (docs/method.md, "Views and the action"): about 0.8/0.8/0.8/0.2."""
    return ViewConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    # 'embedded' = the procedurally generated default set (no download); otherwise an ImageFolder path
    # (class subfolders, as ImageNet's train/ layout) or a folder of WebDataset tar shards (KEY.jpg / KEY.png +
    # KEY.cls; written by `python -m engine.data shard`), each rank reading whole shards.
    dataset: str = "embedded"
    img_size: int = 224
    batch_size: int = 128  # per rank
    num_workers: int = 8
    # the embedded set: number of classes and images per class (train split; val is a quarter of it)
    embedded_classes: int = 10
    embedded_per_class: int = 200
    embedded_native_size: int = 96  # generated resolution before the random resized crop
    # evaluation transform: resize the shorter side to img_size / eval_crop_fraction, then center crop
    eval_crop_fraction: float = 0.875

    def validate(self) -> None:
        if self.img_size <= 0:
            raise ConfigError(f"data.img_size={self.img_size}: must be positive")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: must be >= 0")


# ----------------------------------------------------------------------------------------------------
# Masks: union of blocks as target; context = one large block minus the targets (I-JEPA)
# ----------------------------------------------------------------------------------------------------
@dataclass
class MaskConfig:
    num_blocks: int = 4
    block_scale: Tuple[float, float] = (0.15, 0.2)  # fraction of the patch grid per target block
    aspect_ratio: Tuple[float, float] = (0.75, 1.5)  # target blocks' height / width
    # 'block': the context is one block of context_scale of the grid (aspect 1) with the targets removed
    # (I-JEPA's encoder mask, about 41% of a 14x14 grid); 'complement': every non-target patch (about 52%)
    context: str = "block"
    context_scale: Tuple[float, float] = (0.85, 1.0)
    min_context: int = 4  # a sample left with fewer context patches is redrawn (targets and context block)

    def validate(self) -> None:
        if self.num_blocks < 1:
            raise ConfigError(f"masks.num_blocks={self.num_blocks}: need at least one target block")
        lo, hi = self.block_scale
        if not 0.0 < lo <= hi < 1.0:
            raise ConfigError(f"masks.block_scale={self.block_scale}: need 0 < min <= max < 1")
        lo, hi = self.aspect_ratio
        if not 0.0 < lo <= hi:
            raise ConfigError(f"masks.aspect_ratio={self.aspect_ratio}: need 0 < min <= max")
        if self.context not in ("block", "complement"):
            raise ConfigError(f"masks.context={self.context!r}: use 'block' (I-JEPA's context block) or "
                              f"'complement'")
        lo, hi = self.context_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"masks.context_scale={self.context_scale}: need 0 < min <= max <= 1")
        if self.min_context < 1:
            raise ConfigError(f"masks.min_context={self.min_context}: the encoder needs at least one token")


# ----------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------
# name -> (embed_dim, depth, num_heads); timm / I-JEPA sizes
ENCODER_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
CONDITIONING_MODES = ("feature", "sequence", "none")
COND_POSITIONS = ("before", "after", "residual")


@dataclass
class ModelConfig:
    # encoder: a named size, or 'custom' with embed_dim/depth/num_heads below
    encoder: str = "vit_base"
    patch_size: int = 16
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # predictor: IWM^{Equi}_{18,384} by default
    predictor_depth: int = 18
    predictor_width: int = 384
    predictor_heads: int = 12
    conditioning: str = "feature"  # feature | sequence | none (= I-JEPA)
    # feature conditioning: where a mask token's position enters (docs/method.md "Feature conditioning"):
    # 'before' the MLP (MLP([mask token + position, action]), the method's text), 'after' it
    # (MLP([mask token, action]) + position) or 'residual' (token + MLP([token, action]), token = mask token + position)
    cond_position: str = "before"
    # eps of the layer norm applied to the target encoder's features (the regression targets)
    target_norm_eps: float = 1e-6
    # channel layout of the fixed 2-D sin-cos positions (encoder and predictor): 'rows_first' (the first half of
    # the channels encodes the row) or 'columns_first' (MAE's and I-JEPA's get_2d_sincos_pos_embed): weights
    # trained with one layout need it (--init from I-JEPA: columns_first; engine/warm_start.py checks)
    pos_layout: str = "rows_first"

    def encoder_dims(self) -> Tuple[int, int, int]:
        if self.encoder == "custom":
            if None in (self.embed_dim, self.depth, self.num_heads):
                raise ConfigError("model.encoder='custom' needs model.embed_dim, model.depth and model.num_heads")
            return self.embed_dim, self.depth, self.num_heads
        if self.encoder not in ENCODER_SIZES:
            raise ConfigError(
                f"model.encoder={self.encoder!r} is unknown: use one of {sorted(ENCODER_SIZES)} or 'custom'")
        return ENCODER_SIZES[self.encoder]

    def validate(self, img_size: int) -> None:
        dim, _, heads = self.encoder_dims()
        if self.pos_layout not in ("rows_first", "columns_first"):
            raise ConfigError(f"model.pos_layout={self.pos_layout!r}: use rows_first or columns_first (I-JEPA's)")
        if self.patch_size <= 0:
            raise ConfigError(f"model.patch_size={self.patch_size}: must be positive (14 or 16 for the paper's ViTs)")
        if dim % heads:
            raise ConfigError(f"encoder width {dim} is not divisible by its {heads} heads")
        if self.predictor_width % self.predictor_heads:
            raise ConfigError(f"model.predictor_width={self.predictor_width} is not divisible by "
                              f"model.predictor_heads={self.predictor_heads}")
        if img_size % self.patch_size:
            raise ConfigError(f"data.img_size={img_size} is not divisible by model.patch_size={self.patch_size}: "
                              f"pick an image size that is a multiple of the patch size")
        if dim % 4 or self.predictor_width % 4:
            raise ConfigError(f"encoder width {dim} and model.predictor_width={self.predictor_width} must be "
                              f"multiples of 4 (2-D sin-cos positions)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path={self.drop_path}: the stochastic-depth rate must be in [0, 1)")
        if self.conditioning not in CONDITIONING_MODES:
            raise ConfigError(f"model.conditioning={self.conditioning!r}: use one of {CONDITIONING_MODES}")
        if self.cond_position not in COND_POSITIONS:
            raise ConfigError(f"model.cond_position={self.cond_position!r}: use one of {COND_POSITIONS}")
        if not self.target_norm_eps > 0:
            raise ConfigError(f"model.target_norm_eps={self.target_norm_eps}: must be positive (e.g. 1e-6)")


# ----------------------------------------------------------------------------------------------------
# Optimisation (I-JEPA ViT-H/14 defaults, docs/method.md "Optimisation")
# ----------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    epochs: float = 300.0
    warmup_epochs: float = 40.0
    max_steps: Optional[int] = None  # overrides epochs when set
    start_lr: float = 2e-4
    lr: float = 1e-3
    final_lr: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: Tuple[float, float] = (0.9, 0.999)
    ema: Tuple[float, float] = (0.996, 1.0)
    clip_grad: float = 0.0  # gradient-norm clipping; 0 disables (I-JEPA does not clip)
    # images per optimizer step over all ranks; None = ranks x data.batch_size. When larger, gradients
    # are accumulated over global_batch / (ranks x batch_size) micro-batches (must divide exactly).
    global_batch: Optional[int] = None

    def validate(self) -> None:
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError(f"optim.epochs={self.epochs}: must be positive (or set optim.max_steps)")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs={self.warmup_epochs}: must be >= 0")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"optim.max_steps={self.max_steps}: must be positive")
        for name in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay", "clip_grad"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"optim.{name}={v}: must be a finite number >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas}: AdamW needs two coefficients in [0, 1), e.g. [0.9, 0.999]")
        if self.global_batch is not None and self.global_batch <= 0:
            raise ConfigError(f"optim.global_batch={self.global_batch}: must be positive (or None)")
        lo, hi = self.ema
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"optim.ema={self.ema}: need 0 <= start <= end <= 1")


# ----------------------------------------------------------------------------------------------------
# Run: where, how often, which engine settings
# ----------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    zero_stage: int = 1
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    # backends, both read in kernels/dispatch.py (env IWM_KERNELS / IWM_ATTENTION when 'auto'):
    kernels: str = "auto"  # fused ops: auto (Triton on CUDA, reference on CPU) | triton | reference
    attention: str = "auto"  # ragged attention: auto (xformers on CUDA, else sdpa) | xformers | sdpa | reference
    activation_checkpointing: bool = False  # recompute encoder / predictor blocks in the backward pass
    # torch.compile of every ViT block of the trained networks (encoder, predictor), dynamic in the ragged token
    # count (no recompile per batch) with the ragged attention left eager (engine.models.compile_blocks). Off by
    # default: 0.90x img/s at ViT-Ti on CPU (docs/results.md); GPU not yet measured (make gpu-check, benchmarks/e2e.py)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (inductor; aot_eager traces without code generation)
    log_every: int = 10
    # collapse monitors at log steps (engine/monitors.py, docs/method.md "Monitors"): RankMe over the image-level
    # target features of this many batches (0: no monitors), the action's effect on this many samples
    monitor_window: int = 16
    monitor_samples: int = 4
    eval_every: int = 0  # MRR every N steps (0: only at the end)
    ckpt_every: int = 500
    # also save every N minutes of wall clock (0: off); any rank's clock can call it, every rank saves at
    # the same step (engine/preempt.py)
    ckpt_every_minutes: float = 0.0
    keep_checkpoints: int = 2
    # a rank silent this long (no heartbeat, or stuck behind the others) stops the run, named in one line;
    # 0: off (engine/watchdog.py). Must exceed the longest pause of one rank alone (a save, an eval).
    watchdog_seconds: float = 300.0
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    # warm start (--init PATH): a new run's networks start from these weights (our checkpoint.pt, its
    # model.safetensors or run directory, or an I-JEPA checkpoint), at step 0 with fresh optimizer state; part by
    # part report in the log (engine/warm_start.py). Refused into out_dir when it holds another run (--fresh
    # moves that aside); a rerun of the same command resumes the run it started (docs/cluster_resume.md)
    init: str = ""
    progress: bool = True

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision={self.precision!r}: use auto, bf16 or fp32")
        if self.kernels not in ("auto", "triton", "reference"):
            raise ConfigError(f"train.kernels={self.kernels!r}: use auto, triton or reference")
        if self.attention not in ("auto", "xformers", "sdpa", "reference"):
            raise ConfigError(f"train.attention={self.attention!r}: use auto, xformers, sdpa or reference")
        if self.compile and self.zero_stage == 3:
            raise ConfigError("train.compile=true with train.zero_stage=3: ZeRO-3 gathers each block's parameters in "
                              "module hooks that a compiled block would trace; use zero_stage 0-2 with compile, or "
                              "train.compile=false")
        if self.compile_backend not in ("inductor", "aot_eager", "eager"):
            raise ConfigError(f"train.compile_backend={self.compile_backend!r}: use inductor, aot_eager or eager")
        if self.monitor_window < 0 or self.monitor_samples < 1:
            raise ConfigError(f"train.monitor_window={self.monitor_window}, train.monitor_samples="
                              f"{self.monitor_samples}: need a window >= 0 batches (0: no monitors) and >= 1 sample")
        for name in ("log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be positive")
        for name in ("ckpt_every_minutes", "watchdog_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be 0 (off) or positive")


@dataclass
class EvalConfig:
    mrr_candidates: int = 256  # candidate targets per image (docs/method.md "MRR")
    mrr_images: int = 16  # images the MRR is averaged over during training (a trend line; the CLI uses 256)
    probe_epochs: int = 100
    probe_lr: float = 1e-2

    def validate(self) -> None:
        if self.mrr_candidates < 2:
            raise ConfigError(f"eval.mrr_candidates={self.mrr_candidates}: ranking needs at least 2 candidates")
        if self.mrr_images < 1:
            raise ConfigError(f"eval.mrr_images={self.mrr_images}: need at least one image")


# ----------------------------------------------------------------------------------------------------
# Leveraging the world model: finetuning protocols and probes (docs/finetune.md)
# ----------------------------------------------------------------------------------------------------
FINETUNE_PROTOCOLS = ("encoder", "predictor", "end_to_end", "linear", "attentive")


@dataclass
class FinetuneConfig:
    # the pretraining run to start from: its checkpoint.pt or run directory. The network (model section,
    # image size, views) is the checkpoint's; the recipe's model section is replaced by it.
    checkpoint: str = ""
    # the labelled val folder (same class subfolders as data.dataset); '' = the embedded val split, or the
    # sibling 'val' of a data.dataset folder named 'train' (ImageNet layout)
    val_data: str = ""
    # encoder: encoder + head, no predictor | predictor: frozen encoder, predictor + attentive head |
    # end_to_end: encoder + predictor + attentive head | linear / attentive: probes on the frozen encoder
    protocol: str = "encoder"
    # predictor protocols: 'pretrained' (the world model) or 'random' (the paper's control)
    predictor_init: str = "pretrained"
    # which pretrained encoder starts every protocol: 'target' (the EMA encoder) or 'context' (the online one)
    encoder_weights: str = "target"
    # encoder protocol's head: 'attentive' (one learned query, one cross-attention block, a linear layer)
    # or 'average' (average-pooled tokens, layer norm, linear); the predictor protocols are always attentive
    head: str = "attentive"
    # LR multiplier of a pretrained predictor (the paper: 1/10 of the random-predictor run's LR); 1 for a random one
    predictor_lr_scale: float = 0.1
    # layer-wise LR decay of the trained encoder: block i of L gets decay^(L + 1 - (i + 1)) (1: off)
    layer_decay: float = 0.65
    # stochastic depth of the trained ViTs (becomes model.drop_path, linear in depth)
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup alpha (0: off)
    cutmix: float = 1.0  # cutmix alpha (0: off)
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    # timm RandAugment spec ('' turns it off), after a random resized crop of scale crop_scale and a flip
    # (mmax9: magnitude 10 would ask posterize for 0 bits, which current Pillow refuses)
    randaugment: str = "rand-m9-mstd0.5-inc1-mmax9"
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    eval_batch_size: int = 128  # validation batch (top-1 / top-5 on the val split at every eval)

    def validate(self) -> None:
        if self.protocol not in FINETUNE_PROTOCOLS:
            raise ConfigError(f"finetune.protocol={self.protocol!r}: use one of {FINETUNE_PROTOCOLS}")
        if self.predictor_init not in ("pretrained", "random"):
            raise ConfigError(f"finetune.predictor_init={self.predictor_init!r}: use 'pretrained' or 'random'")
        if self.encoder_weights not in ("target", "context"):
            raise ConfigError(f"finetune.encoder_weights={self.encoder_weights!r}: use 'target' or 'context'")
        if self.head not in ("attentive", "average"):
            raise ConfigError(f"finetune.head={self.head!r}: use 'attentive' or 'average'")
        for name in ("predictor_lr_scale", "layer_decay"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"finetune.{name}={v}: an LR multiplier in (0, 1]")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"finetune.drop_path={self.drop_path}: a rate in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"finetune.label_smoothing={self.label_smoothing}: use a value in [0, 1)")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"finetune.{name}={getattr(self, name)}: an alpha >= 0 (0 turns it off)")
        for name in ("mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"finetune.{name}={getattr(self, name)} is a probability: use [0, 1]")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"finetune.crop_scale={self.crop_scale}: need 0 < min <= max <= 1")
        if self.eval_batch_size < 1:
            raise ConfigError(f"finetune.eval_batch_size={self.eval_batch_size}: must be positive")


@dataclass
class IWMConfig:
    name: str = "iwm"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "IWMConfig":
        self.data.validate()
        self.views.validate()
        self.masks.validate()
        self.model.validate(self.data.img_size)
        self.optim.validate()
        self.train.validate()
        self.eval.validate()
        self.finetune.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IWMConfig":
        def build(kind, values):
            kw = {}
            for f in dataclasses.fields(kind):
                if f.name not in values:
                    continue
                v = values[f.name]
                sub = _SECTIONS.get(f.name) if kind is IWMConfig else None
                if sub is not None:
                    v = build(sub, v)
                elif isinstance(v, list):
                    v = tuple(v)
                kw[f.name] = v
            return kind(**kw)

        d = dict(d)
        if "model" in d and "cond_position" not in d["model"]:  # saved before the option: the MLP took the position
            d["model"] = {**d["model"], "cond_position": "before"}
        return build(cls, d)

    def override(self, assignment: str) -> None:
        """Apply one ``section.field=value`` override (value parsed as a Python literal)."""
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected section.field=value, e.g. optim.lr=5e-4")
        key, raw = assignment.split("=", 1)
        parts = key.strip().split(".")
        target: Any = self
        for p in parts[:-1]:
            if not hasattr(target, p):
                raise ConfigError(f"--set {key}: no config section {p!r}; sections are {list(_SECTIONS)}")
            target = getattr(target, p)
        leaf = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
        if leaf not in fields:
            raise ConfigError(f"--set {key}: unknown field {leaf!r}; known: {list(fields)}")
        setattr(target, leaf, _parse_value(key, raw.strip(), str(fields[leaf].type)))


def _parse_value(key: str, raw: str, kind: str):
    """Parse an override to its field's declared type (the annotation, as written in this file)."""
    if kind in ("str", "Optional[str]"):
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    if kind == "bool" and raw.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return raw.lower() in ("true", "yes", "on", "1")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--set {key}={raw}: not a valid {kind}") from None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "Optional[int]": value is None or (isinstance(value, int) and not isinstance(value, bool)),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
    }
    if kind.startswith("Tuple"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"--set {key}={raw}: expected a pair of numbers, e.g. {key}=[0.3, 1.0]")
        return tuple(float(v) for v in value)
    if kind in ok and not ok[kind]:
        raise ConfigError(f"--set {key}={raw}: expected {kind}")
    return float(value) if kind == "float" else value


_SECTIONS = {"data": DataConfig, "views": ViewConfig, "masks": MaskConfig, "model": ModelConfig,
             "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
             "finetune": FinetuneConfig}


def load_recipe(path: str, overrides: Sequence[str] = ()) -> IWMConfig:
    """Import a recipe file (``recipes/*.py``), call its ``config()`` and apply ``section.field=value``
    overrides; not validated (the caller validates for what it does with the config). The one recipe loader:
    ``engine.plan``, the benchmarks and the tests all read recipes through it."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file {path!r} not found: pass a path such as recipes/pretrain_vith.py")
    name = "_recipe_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken recipe: say which file
        raise ConfigError(f"recipe file {path!r} failed to import: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"recipe file {path!r} has no config() function returning an IWMConfig")
    cfg = module.config()
    if not isinstance(cfg, IWMConfig):
        raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, expected engine.config.IWMConfig")
    for assignment in overrides:
        cfg.override(assignment)
    return cfg
