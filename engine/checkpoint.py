"""Checkpoints: DeepSpeed's sharded engine state for resuming, plus one consolidated weights file.

Layout of a run directory::

    out_dir/
      checkpoint.pt        encoder, predictor, target encoder, config, step: what eval / finetune load
      ds/<tag>/            DeepSpeed engine state (model + ZeRO-partitioned optimizer), one per save
      ds/latest            the tag of the newest complete save (written by DeepSpeed after the save)

``checkpoint.pt`` is written to a temporary file and renamed, so a crash mid-write never leaves a
truncated file; ``ds/latest`` is rewritten the same way, by rank 0, only after every rank has written its
part of the new tag (DeepSpeed's own ``latest`` is switched off).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional

import torch

FORMAT = "iwm-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not an IWM checkpoint; the message says what to pass."""


def atomic_save(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(path: str, payload: dict) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def save_weights(path: str, *, config: dict, step: int, encoder, predictor, target_encoder,
                 metrics: Optional[dict] = None) -> None:
    atomic_save({
        "format": FORMAT,
        "config": config,
        "step": step,
        "encoder": encoder.state_dict(),
        "predictor": predictor.state_dict(),
        "target_encoder": target_encoder.state_dict(),
        "metrics": metrics or {},
    }, path)


def resolve_checkpoint(path: str) -> str:
    """Accept a weights file or a run directory holding ``checkpoint.pt``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: pass the run's checkpoint.pt or its "
                              f"out_dir (e.g. runs/pretrain_tiny/checkpoint.pt)")
    if os.path.isdir(path):
        cand = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(cand):
            raise CheckpointError(f"{path!r} is a folder without checkpoint.pt: pass a run directory written by "
                                  f"the trainer, or the .pt file itself")
        return cand
    return path


def load_weights(path: str, map_location="cpu") -> Dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); "
                              f"it is not a torch file or it is corrupt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an IWM checkpoint (no '{FORMAT}' marker): pass the "
                              f"checkpoint.pt written by recipes/pretrain_*.py")
    return ckpt


def prune_ds_tags(ds_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` DeepSpeed tags (step_XXXXXXXX, sorted by step)."""
    if keep <= 0 or not os.path.isdir(ds_dir):
        return
    tags = sorted(d for d in os.listdir(ds_dir) if d.startswith("step_") and os.path.isdir(os.path.join(ds_dir, d)))
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(ds_dir, tag), ignore_errors=True)


def ds_tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_ds_tag(ds_dir: str) -> Optional[str]:
    latest = os.path.join(ds_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        tag = f.read().strip()
    return tag if tag and os.path.isdir(os.path.join(ds_dir, tag)) else None


def write_latest(ds_dir: str, tag: str) -> None:
    """Point ``ds/latest`` at `tag` atomically; call once every rank has finished writing that tag."""
    tmp = os.path.join(ds_dir, f"latest.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(ds_dir, "latest"))


def remove_checkpoints(out_dir: str) -> None:
    """A fresh start in an old run directory: drop its DeepSpeed states and weights file, so that they
    can neither be pruned in place of the new run's nor be mistaken for it."""
    shutil.rmtree(os.path.join(out_dir, "ds"), ignore_errors=True)
    weights = os.path.join(out_dir, "checkpoint.pt")
    if os.path.isfile(weights):
        os.remove(weights)
