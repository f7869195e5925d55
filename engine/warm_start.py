"""Warm starts: a new run's networks initialised from weights (``--init PATH``, ``train.init``).

Three layouts are read, recognised from the file itself:

* ``checkpoint.pt`` of one of our runs (or its run directory): parts ``encoder``, ``predictor``,
  ``target_encoder`` (pretraining), or ``model`` (finetuning: ``encoder.*``, ``predictor.*``, ``head.*``);
* ``model.safetensors`` beside it: the same tensors, keys prefixed by their part;
* the official I-JEPA layout (``torch.save`` of a dict with ``encoder``, ``predictor`` and ``target_encoder``
  state dicts, keys with DDP's ``module.`` prefix and I-JEPA's ViT names: ``patch_embed.proj``, ``pos_embed``,
  ``blocks.N.attn.qkv``, ..., ``predictor_embed``, ``mask_token``, ``predictor_blocks.N...``,
  ``predictor_proj``), mapped onto our names by :func:`ijepa_to_ours`.

:func:`read_weights` gives a :class:`WeightsSource` (parts of canonical state dicts and, for our own files,
the config they were trained with); :func:`load_part` copies one part into a module, checking every shape, and
says what it loaded and what it left at its initialisation. Nothing is loaded silently: a tensor whose shape
differs is a :class:`~engine.checkpoint.CheckpointError` naming it; tensors the module does not have and
tensors the file does not have are both reported, part by part. Every file is read with
``torch.load(weights_only=True)`` (or safetensors): nothing read can run code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from engine.checkpoint import FORMAT, SAFETENSORS, CheckpointError, load_weights, resolve_checkpoint, safe_load

PARTS = ("encoder", "predictor", "target_encoder", "head")
# I-JEPA's predictor names -> ours (engine/models.py Predictor); the encoder's differ only by our ``vit.``
IJEPA_PREDICTOR = (("predictor_embed.", "embed."), ("predictor_blocks.", "blocks."), ("predictor_norm.", "norm."),
                   ("predictor_proj.", "proj."), ("mask_token", "mask_token"))
# the fixed sin-cos tables: key in a state dict -> the buffer our forward reads (engine/models.py). They are not
# trained, but weights only work with the table they were trained with: a file's table is checked against ours
FIXED_TABLES = {"vit.pos_embed": "pos_embed", "pos_embed": "pos_embed"}


@dataclass
class WeightsSource:
    """Weights read from a file: ``parts[name] = {key: tensor}`` in our names, the layout recognised, and the
    config of the run that wrote them (None for an I-JEPA file)."""
    path: str
    layout: str  # "checkpoint.pt" | "model.safetensors" | "i-jepa"
    parts: Dict[str, Dict[str, torch.Tensor]]
    config: Optional[dict] = None
    kind: str = "pretrain"
    step: Optional[int] = None
    meta: dict = field(default_factory=dict)


def _fail(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"--init {path!r}: {why}; pass our checkpoint.pt / model.safetensors (or the run "
                           f"directory), or an I-JEPA checkpoint (a dict with encoder, predictor, target_encoder)")


def _strip(sd: dict, prefix: str = "module.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _split_model(model: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """A finetuned network's state dict (``encoder.*``, ``predictor.*``, ``head.*``) -> parts."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in model.items():
        part, _, rest = k.partition(".")
        if part in PARTS and rest:
            parts.setdefault(part, {})[rest] = v
    return parts


def ijepa_to_ours(part: str, key: str) -> Optional[str]:
    """The name in our modules of I-JEPA's ``key`` of ``part`` (``module.`` already stripped)."""
    if part in ("encoder", "target_encoder"):
        return "vit." + key
    if key == "predictor_pos_embed":
        return "pos_embed"  # our predictor's fixed table is a buffer: checked, not loaded
    for theirs, ours in IJEPA_PREDICTOR:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key  # unknown names pass through and are reported as not loaded


def _from_ijepa(path: str, ckpt: dict) -> WeightsSource:
    parts = {}
    for part in ("encoder", "predictor", "target_encoder"):
        sd = ckpt.get(part)
        if sd is None:
            continue
        if not isinstance(sd, dict):
            raise _fail(path, f"its {part!r} entry is a {type(sd).__name__}, not a state dict")
        mapped = {}
        for k, v in _strip(sd).items():
            ours = ijepa_to_ours(part, k)
            if ours is not None and torch.is_tensor(v):
                mapped[ours] = v
        parts[part] = mapped
    step = ckpt.get("epoch")
    return WeightsSource(path, "i-jepa", parts, None, "pretrain", int(step) if isinstance(step, int) else None)


def _ours(path: str, payload: dict, layout: str) -> WeightsSource:
    kind = payload.get("kind", "pretrain")
    parts = (_split_model(payload["model"]) if kind == "finetune"
             else {p: payload[p] for p in PARTS if isinstance(payload.get(p), dict)})
    return WeightsSource(path, layout, parts, payload.get("config"), kind, payload.get("step"))


def read_weights(path: str) -> WeightsSource:
    """Read ``path`` (our checkpoint.pt, a run directory, model.safetensors, or an I-JEPA checkpoint)."""
    if not path:
        raise CheckpointError("train.init is empty: pass --init PATH (a checkpoint.pt, model.safetensors, a run "
                              "directory, or an I-JEPA checkpoint)")
    if not os.path.exists(path):
        raise _fail(path, "it does not exist")
    path = resolve_checkpoint(path)  # a run directory: its checkpoint.pt (or model.safetensors)
    if path.endswith(".safetensors"):
        return _ours(path, load_weights(path), SAFETENSORS)
    try:
        ckpt = safe_load(path)
    except Exception as e:  # truncated, not a torch file, a pickle that wants to run code
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise _fail(path, f"it cannot be read ({type(e).__name__}: {first}); corrupt, not a torch file, or it "
                          f"holds code (never loaded)") from None
    if not isinstance(ckpt, dict):
        raise _fail(path, f"it holds a {type(ckpt).__name__}, not a dict of state dicts")
    if ckpt.get("format") == FORMAT:
        return _ours(path, ckpt, "checkpoint.pt")
    if any(isinstance(ckpt.get(p), dict) for p in ("encoder", "predictor", "target_encoder")):
        return _from_ijepa(path, ckpt)
    raise _fail(path, f"it is neither an IWM checkpoint (no '{FORMAT}' marker) nor I-JEPA's layout (keys "
                      f"{sorted(map(str, ckpt))[:5]})")


def _fit(name: str, theirs: torch.Tensor, ours: torch.Tensor) -> Optional[torch.Tensor]:
    """``theirs`` in ``ours``'s shape, or None. Only I-JEPA's mask token [1, 1, W] is reshaped (ours is [W])."""
    if theirs.shape == ours.shape:
        return theirs
    if name.endswith("mask_token") and theirs.numel() == ours.numel():
        return theirs.reshape(ours.shape)
    return None


def load_part(module: nn.Module, state: Optional[Dict[str, torch.Tensor]], part: str, path: str) -> str:
    """Copy ``state`` into ``module`` (every shape checked first: a mismatch names the first tensor and loads
    nothing). Returns one line: how many tensors were loaded, which were left at their initialisation, which
    of the file's were not used."""
    own = module.state_dict()
    if not state:
        return f"{part}: left at its initialisation ({len(own)} tensors; the file has no {part})"
    fitted = {}
    for k, v in state.items():
        if k in own:
            got = _fit(k, v, own[k])
            if got is None:
                raise CheckpointError(f"--init {path!r}: {part}.{k} has shape {tuple(v.shape)} in the file, "
                                      f"{tuple(own[k].shape)} in this model: set the model config (model.encoder, "
                                      f"patch_size, predictor_width, data.img_size, ...) to the file's network")
            fitted[k] = got.to(own[k].dtype)
    check_fixed_tables(module, state, part, path)
    missing = [k for k in own if k not in fitted]
    unused = [k for k in state if k not in own and k not in FIXED_TABLES]
    with torch.no_grad():
        module.load_state_dict({**own, **fitted}, strict=True)  # in place: views (the EMA buffer) stay intact
    line = f"{part}: loaded {len(fitted)} of {len(own)} tensors"
    if missing:
        line += f"; left at initialisation: {_names(missing)}"
    if unused:
        line += f"; in the file but not in this model (not used): {_names(unused)}"
    return line


def check_fixed_tables(module: nn.Module, state: Dict[str, torch.Tensor], part: str, path: str) -> None:
    """A file's fixed position table must be the one this model's forward adds (model.pos_layout)."""
    buffers = dict(module.named_buffers())
    for key, buffer in FIXED_TABLES.items():
        if key in state and buffer in buffers:
            ours = buffers[buffer]
            theirs = state[key].float().reshape(-1)
            if theirs.numel() != ours.numel() or not torch.allclose(theirs, ours.reshape(-1).cpu(), atol=1e-5):
                raise CheckpointError(
                    f"--init {path!r}: {part}.{key}, the fixed sin-cos position table, differs from this model's "
                    f"(model.pos_layout, data.img_size, patch_size): I-JEPA's tables encode the column first, "
                    f"set --set model.pos_layout=columns_first")


def _names(keys: List[str], show: int = 6) -> str:
    """``a.0.b, a.1.b, ...`` compressed by block index: ``blocks.*.x (12)``."""
    groups: Dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+\.", ".*.", k)
        groups[g] = groups.get(g, 0) + 1
    shown = [g if n == 1 else f"{g} ({n})" for g, n in list(groups.items())[:show]]
    more = len(groups) - show
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def warm_start(modules: Dict[str, nn.Module], source: WeightsSource,
               aliases: Optional[Dict[str, Tuple[str, ...]]] = None) -> List[str]:
    """Load ``source`` into ``modules`` (``{part: module}``), part by part. ``aliases[part]`` lists the parts of
    the file to take, first present wins (e.g. a target encoder from the file's encoder when the file has
    none). Returns the report, one line per part, headed by what was read."""
    lines = [f"warm start from {source.path} ({source.layout}"
             + (f", {source.kind} step {source.step}" if source.step is not None else "") + ")"]
    for part, module in modules.items():
        chosen = next((p for p in (aliases or {}).get(part, (part,)) if source.parts.get(p)), None)
        line = load_part(module, source.parts.get(chosen) if chosen else None, part, source.path)
        if chosen and chosen != part:
            line = line.replace(f"{part}: ", f"{part} (from the file's {chosen}): ", 1)
        lines.append(line)
    return lines
