"""Weights that leave the engine: a run's encoder (or predictor) as a folder timm loads with one call.

    python -m engine.export RUN OUT [--part target_encoder|encoder|predictor]

``RUN`` is a run directory, its ``checkpoint.pt`` or its ``model.safetensors``. ``OUT`` gets the layout of
a Hugging Face hub repository for timm: ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``
with the input size, mean / std and crop fraction) and ``model.safetensors`` in timm's own key names, so

    model = timm.create_model("local-dir:OUT", pretrained=True)   # a timm VisionTransformer
    feats = model.forward_features(x)                             # [B, N, D], x normalised with mean / std

gives the encoder's patch features (no class token; ``model(x)`` average-pools them). Our encoders *are*
timm VisionTransformers (``engine.models.Encoder.vit``), so the export is the same tensors under timm's
names, written by timm's own ``save_for_hf``; the one difference is where the input normalisation lives
(ours inside the module, timm's in the data pipeline: ``timm.data.resolve_data_config(model=model)``).

``--part predictor`` writes the predictor in the same layout with ``architecture: iwm_predictor``, an
architecture this module registers with timm: ``import engine.export`` first, then the same call loads it
(its forward takes packed context tokens, masks and actions: it is for this engine's code, not a backbone).

Pushing to the hub is then one upload of the folder as it is (network access and a token needed; nothing
in the tests does it)::

    api = huggingface_hub.HfApi()
    api.create_repo("USER/iwm-vitb16", exist_ok=True)  # once
    api.upload_folder(repo_id="USER/iwm-vitb16", folder_path="OUT")

after which ``timm.create_model("hf-hub:USER/iwm-vitb16", pretrained=True)`` loads it anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model

from engine.checkpoint import CheckpointError, load_weights
from engine.config import IWMConfig
from engine.models import Predictor, sincos_2d

PARTS = ("target_encoder", "encoder", "predictor")
PREDICTOR_ARCH = "iwm_predictor"


# ----------------------------------------------------------------------------------------------------
# The encoder as a timm VisionTransformer
# ----------------------------------------------------------------------------------------------------
def timm_architecture(cfg: IWMConfig) -> Tuple[str, dict]:
    """(timm architecture name, model_args) that rebuild ``engine.models.Encoder(cfg).vit`` in timm.

    The name is timm's own for the named sizes (``vit_base_patch16_224``, ``vit_huge_patch14_224``, ...) when
    timm registers one; otherwise (a custom width) ``vit_base_patch16_224``: the model_args carry every shape
    field and override the name's defaults, as timm's factory applies them."""
    m = cfg.model
    dim, depth, heads = m.encoder_dims()
    size = m.encoder.replace("vit_", "")
    named = f"vit_{size}_patch{m.patch_size}_{cfg.data.img_size}"
    arch = named if m.encoder != "custom" and timm.is_model(named) else "vit_base_patch16_224"
    args = dict(img_size=cfg.data.img_size, patch_size=m.patch_size, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=m.mlp_ratio, qkv_bias=True, class_token=False, global_pool="avg", fc_norm=False,
                num_classes=0)
    return arch, args


def data_config(cfg: IWMConfig) -> dict:
    """The preprocessing the weights expect (``engine.data.EvalTransform`` + the encoder's normalisation)."""
    return {"input_size": (3, cfg.data.img_size, cfg.data.img_size), "mean": tuple(IMAGENET_DEFAULT_MEAN),
            "std": tuple(IMAGENET_DEFAULT_STD), "crop_pct": cfg.data.eval_crop_fraction, "interpolation": "bilinear",
            "crop_mode": "center"}


def vit_state_dict(cfg: IWMConfig, encoder_state: dict) -> dict:
    """Our encoder's state dict (``vit.blocks.0.attn.qkv.weight``, ...) in timm's names (``blocks.0...``).
    ``pos_embed`` is the fixed sin-cos table the encoder's forward adds (``Encoder.pos_embed``, a buffer; the
    frozen ``vit.pos_embed`` parameter is its copy)."""
    out = {k[len("vit."):]: v for k, v in encoder_state.items() if k.startswith("vit.")}
    if "pos_embed" not in out:
        raise CheckpointError("the checkpoint's encoder holds no ViT weights (no 'vit.pos_embed'): it is not from "
                              "this engine's Encoder")
    grid = cfg.data.img_size // cfg.model.patch_size
    out["pos_embed"] = sincos_2d(cfg.model.encoder_dims()[0], grid, grid)[None].to(out["pos_embed"].dtype)
    return out


def timm_encoder(cfg: IWMConfig, encoder_state: dict) -> torch.nn.Module:
    """A timm VisionTransformer holding the encoder's weights (strict: every tensor has its place)."""
    arch, args = timm_architecture(cfg)
    # our own pretrained_cfg, not the name's (which would claim its published weights' tag and licence)
    pretrained_cfg = dict(data_config(cfg), architecture=arch, num_classes=0, first_conv="patch_embed.proj",
                          classifier="head", fixed_input_size=True)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
    try:
        model.load_state_dict(vit_state_dict(cfg, encoder_state), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f"the encoder's weights do not fit timm's {arch} with {args} ({first})") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The predictor, registered as a timm architecture
# ----------------------------------------------------------------------------------------------------
class ExportedPredictor(Predictor):
    """The predictor rebuilt from ``config.json``'s model_args (``iwm_config``: the engine config's model, data
    and views sections). timm's factory passes ``num_classes`` / ``in_chans`` / ``global_pool``: not used."""

    def __init__(self, iwm_config: dict, num_classes: int = 0, **_timm_defaults):
        cfg = IWMConfig.from_dict(iwm_config)
        dim, _, _ = cfg.model.encoder_dims()
        grid = (cfg.data.img_size // cfg.model.patch_size,) * 2
        super().__init__(cfg, dim, grid, cfg.views.action_dim)
        self.num_classes = 0


@register_model
def iwm_predictor(pretrained: bool = False, **kwargs) -> ExportedPredictor:
    """timm's entry for an exported IWM predictor (``--part predictor``)."""
    from timm.models._builder import build_model_with_cfg

    kwargs.setdefault("pretrained_cfg", {"architecture": PREDICTOR_ARCH, "num_classes": 0})
    return build_model_with_cfg(ExportedPredictor, PREDICTOR_ARCH, pretrained, **kwargs)


def predictor_config(cfg: IWMConfig) -> dict:
    """The sections that shape the predictor, JSON-ready."""
    d = json.loads(json.dumps(cfg.to_dict()))
    return {"model": d["model"], "data": {"img_size": d["data"]["img_size"]}, "views": d["views"]}


# ----------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------
def _write_predictor(folder: str, cfg: IWMConfig, state: dict) -> None:
    from safetensors.torch import save_file

    model = ExportedPredictor(predictor_config(cfg))
    model.load_state_dict(state, strict=True)  # every tensor has its place
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    config = {"architecture": PREDICTOR_ARCH, "num_classes": 0, "model_args": {"iwm_config": predictor_config(cfg)},
              "pretrained_cfg": {"architecture": PREDICTOR_ARCH, "num_classes": 0, "custom_load": False}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export(run: str, out: str, part: str = "target_encoder") -> str:
    """Write ``part`` of the run's weights to the folder ``out`` (the folder appears whole or not at all: it is
    written beside ``out`` and renamed). Returns the timm model name that loads it."""
    from timm.models import save_for_hf

    if part not in PARTS:
        raise CheckpointError(f"--part {part!r}: export one of {', '.join(PARTS)}")
    ckpt = load_weights(run)
    if ckpt.get("kind", "pretrain") != "pretrain":
        raise CheckpointError(f"{run!r} is a {ckpt['kind']} checkpoint: export takes a pretraining run's "
                              f"checkpoint.pt, model.safetensors or folder")
    cfg = IWMConfig.from_dict(ckpt["config"])
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out!r} exists and is not an empty folder: pass a new OUT folder (nothing is "
                              f"overwritten)")
    out = os.path.abspath(out)
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if part == "predictor":
            _write_predictor(tmp, cfg, ckpt["predictor"])
        else:
            model = timm_encoder(cfg, ckpt[part])
            save_for_hf(model, tmp, model_args=timm_architecture(cfg)[1], safe_serialization=True,
                        data_config=data_config(cfg))
        os.replace(tmp, out)  # onto a missing or empty folder: readers never see half an export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"local-dir:{out}"
