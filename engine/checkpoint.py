"""Checkpoints and the run directory: safe, atomic, never deleted before a run can start.

Layout of a run directory::

    out_dir/
      .lock                one run per folder: an fcntl lock held by the running job (its PID inside)
      config.json          the run's full config (written once the run has proved it can start)
      checkpoint.pt        encoder, predictor, target encoder, config, step: what eval / finetuning load
      model.safetensors    the same payload as safetensors (metadata: config, step, ...): loads the same way
      ds/<tag>/            DeepSpeed engine state (model + ZeRO-partitioned optimizer), one per save,
                           rng_rank_<r>.pt (every random stream of rank r) and manifest.json (written last:
                           files, world_size, zero_stage); ds/<tag>/universal/ the tag converted for another
                           number of ranks (DeepSpeed's universal checkpoint, made on such a resume)
      ds/latest            the newest complete tag (for people and DeepSpeed tools; resume trusts manifests)
      previous/<time>/     an older run moved aside by a fresh start (--fresh): nothing is ever deleted

Guarantees: every file is written to a temporary name and renamed, so a kill -9 never leaves a truncated
file under a real name; a tag counts only once its manifest (file names and sizes, written after every rank
finished) matches what is on disk, so resume takes the newest complete tag and falls back past a partial
or truncated one; nothing read from disk can run code (``torch.load(weights_only=True)`` everywhere,
DeepSpeed's resume included, through :class:`SafeCheckpointEngine`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

FORMAT = "iwm-checkpoint-v1"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint or run directory cannot be used as given; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# Atomic writes and safe reads
# ----------------------------------------------------------------------------------------------------
def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename onto ``path``: readers never see half a file. A full disk becomes a
    CheckpointError naming the folder (the temporary file is removed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"disk full while writing {path}: free space in {folder} (df -h {folder}) or "
                                  f"point --out at another disk; the previous complete checkpoint is intact") from None
        raise
    except Exception:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: str, payload: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
    atomic_write(path, write)


def safe_load(path: str, map_location="cpu") -> Any:
    """torch.load that cannot execute code (tensors, containers and plain values only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------------------------------
# The weights file (checkpoint.pt)
# ----------------------------------------------------------------------------------------------------
def weights_payload(*, config: dict, step: int, encoder, predictor, target_encoder,
                    metrics: Optional[dict] = None) -> dict:
    """What ``checkpoint.pt`` holds (tensors copied: safe to keep after a ZeRO-3 gather is released)."""
    copy = lambda m: {k: v.detach().clone().cpu() for k, v in m.state_dict().items()}  # noqa: E731
    return {"format": FORMAT, "config": config, "step": step, "encoder": copy(encoder),
            "predictor": copy(predictor), "target_encoder": copy(target_encoder),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()}}


SAFETENSORS = "model.safetensors"
_META_KEYS = ("format", "kind", "config", "step")


def write_weights(path: str, payload: dict) -> None:
    """``checkpoint.pt`` and, beside it, ``model.safetensors``: the same tensors, prefixed by part
    (``target_encoder.vit.blocks.0.attn.qkv.weight``), with every other field (config, step, kind, metrics,
    classes, protocol) as JSON metadata, so that either file loads the same payload (:func:`load_weights`)."""
    from safetensors.torch import save_file

    atomic_save(payload, path)
    tensors = {f"{part}.{k}": v.contiguous() for part, sd in payload.items() if isinstance(sd, dict)
               for k, v in sd.items() if torch.is_tensor(v)}
    parts = sorted({part for part, sd in payload.items() if isinstance(sd, dict) and part != "config"
                    and any(torch.is_tensor(v) for v in sd.values())})
    meta = {"format": FORMAT, "kind": str(payload.get("kind", "pretrain")), "config": json.dumps(payload["config"]),
            "step": str(payload["step"]), "parts": json.dumps(parts),
            "fields": json.dumps({k: v for k, v in payload.items() if k not in _META_KEYS and k not in parts})}
    atomic_write(os.path.join(os.path.dirname(os.path.abspath(path)), SAFETENSORS),
                 lambda tmp: save_file(tensors, tmp, metadata=meta))


def resolve_checkpoint(path: str) -> str:
    """Accept a weights file (``checkpoint.pt``, ``best.pt`` or ``model.safetensors``) or a run directory
    holding ``checkpoint.pt`` (or only ``model.safetensors``)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: pass the run's checkpoint.pt or its "
                              f"out_dir (e.g. runs/pretrain_tiny/checkpoint.pt)")
    if os.path.isdir(path):
        for name in ("checkpoint.pt", SAFETENSORS):
            cand = os.path.join(path, name)
            if os.path.isfile(cand):
                return cand
        raise CheckpointError(f"{path!r} is a folder without checkpoint.pt or {SAFETENSORS}: pass a run directory "
                              f"written by the trainer, or the weights file itself")
    return path


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with its header length (8 bytes, little endian) and then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_safetensors_weights(path: str) -> Dict[str, Any]:
    """The payload of a run's ``model.safetensors`` (what :func:`write_weights` put there), in the same form as
    ``checkpoint.pt``: ``{"format", "kind", "config", "step", <part>: {name: tensor}, ...}``. Reading a
    safetensors file runs no code. The one loader of that file: eval, finetuning and warm starts call it
    through :func:`load_weights`."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names} if meta.get("format") == FORMAT else {}
    except Exception as e:  # a truncated or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {path!r} as safetensors ({type(e).__name__}: {first}); it is corrupt or "
                              f"not a safetensors file: pass the run's checkpoint.pt or model.safetensors") from None
    if meta.get("format") != FORMAT:
        what = ("weights exported for timm (python -m engine.export): load them with "
                "timm.create_model('local-dir:FOLDER', pretrained=True)"
                if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")) and
                not meta else "a safetensors file from elsewhere")
        raise CheckpointError(f"{path!r} is not an IWM checkpoint (no '{FORMAT}' marker in its metadata; it looks like "
                              f"{what}): pass the model.safetensors or checkpoint.pt a training run wrote")
    try:
        payload = {"format": FORMAT, "config": json.loads(meta["config"]), "step": int(meta["step"])}
        if meta.get("kind", "pretrain") != "pretrain":
            payload["kind"] = meta["kind"]
        payload.update(json.loads(meta.get("fields", "{}")))
        parts = json.loads(meta["parts"]) if "parts" in meta else sorted({n.split(".", 1)[0] for n in names})
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path!r}: its metadata is incomplete ({type(e).__name__}: {e}): pass the run's "
                              f"checkpoint.pt instead") from None
    for part in parts:
        payload[part] = {n[len(part) + 1:]: t for n, t in tensors.items() if n.startswith(part + ".")}
    return payload


def load_weights(path: str, map_location="cpu") -> Dict[str, Any]:
    """A run's weights as one payload, from ``checkpoint.pt`` / ``best.pt``, ``model.safetensors`` or the run
    directory; never runs code from the file."""
    path = resolve_checkpoint(path)
    if _is_safetensors(path):
        return load_safetensors_weights(path)
    try:
        ckpt = safe_load(path, map_location)
    except Exception as e:  # truncated, not a torch file, or a pickle that wants to run code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {first[:200]}); it is not "
                              f"an IWM checkpoint, it is corrupt, or it holds code (never loaded)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an IWM checkpoint (no '{FORMAT}' marker): pass the "
                              f"checkpoint.pt (or model.safetensors) written by recipes/pretrain_*.py")
    return ckpt


def save_weights(path: str, **parts) -> None:
    """Write a weights file from modules (e.g. a randomly initialised network for a control run)."""
    write_weights(path, weights_payload(**parts))


# ----------------------------------------------------------------------------------------------------
# DeepSpeed's resume state, loaded without unpickling code
# ----------------------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed's ZeRO checkpoints hold (allow-listed, nothing else)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def SafeCheckpointEngine():
    """DeepSpeed's torch checkpoint engine with ``torch.load(weights_only=True)`` and an allow-list."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class _Safe(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return _Safe()


UNIVERSAL_INFO = "universal_checkpoint_info"  # the entry ds_to_universal requires in a tag's client state
UNIVERSAL_DIR = "universal"


@contextlib.contextmanager
def safe_torch_load():
    """Within: every ``torch.load`` (DeepSpeed's universal converter and loader call it with
    ``weights_only=False``) reads with ``weights_only=True`` and the allow-list of DeepSpeed's classes."""
    original, allowed = torch.load, _deepspeed_safe_globals() + _universal_safe_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        # per call: leaving a nested safe_globals context removes its classes, also ones an outer one added
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _universal_safe_globals() -> list:
    """What ds_to_universal's own files hold besides tensors and plain values."""
    import argparse

    return [argparse.Namespace]


def convert_to_universal(tag_folder: str, out: str) -> None:
    """DeepSpeed's ``ds_to_universal`` of one tag into ``out`` (atomically: a temporary folder renamed), in
    this process, without worker pools."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=tag_folder, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with safe_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Random streams (exact resume)
# ----------------------------------------------------------------------------------------------------
def global_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def reseed_value(seed: int, step: int, rank: int) -> int:
    """The seed of a random stream restarted at ``step`` on ``rank`` (a resume on another number of ranks)."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2 ** 63)


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------------
def ds_tag(step: int) -> str:
    return f"step_{step:08d}"


def _all_ok(ok: bool) -> bool:
    """Every rank's ``ok`` and-ed together (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    t = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() == 0.0


class RunDir:
    """One run directory: its lock, its checkpoints, its config."""

    MOVABLE = ("ds", "checkpoint.pt", "model.safetensors", "config.json", "metrics.csv", "curves.png", "tensorboard",
               "mrr.json", "linear.json", "best.pt", "finetune.json", "attentive.json")

    def __init__(self, path: str):
        self.path = path
        self.ds_dir = os.path.join(path, "ds")
        self.weights = os.path.join(path, "checkpoint.pt")
        self.config_path = os.path.join(path, "config.json")

    # ---- one run per folder --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, enabled: bool = True):
        """Hold ``.lock`` (rank 0) for the run; a second run into the folder stops at once, naming the holder.
        Stale temporary files of a killed run are removed once the lock is held."""
        fd, err = None, None
        if enabled:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._remove_stale_temporaries()
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                fd = None
                err = (f"{self.path} is in use by another run (PID {holder}): wait for it to finish, stop it, or "
                       f"pass another --out")
        if not _all_ok(err is None):
            raise CheckpointError(err or f"{self.path} is in use by another run (see rank 0's message)")
        try:
            yield self
        finally:
            if fd is not None:
                os.close(fd)  # the OS also releases it if the process dies

    def _remove_stale_temporaries(self) -> None:
        for aside in glob.glob(os.path.join(self.ds_dir, "step_*.replaced.tmp.*")):  # a re-save was killed
            tag = os.path.basename(aside).split(".replaced.")[0]
            if self.check_tag(tag) is not None:  # the new save did not finish: the old tag comes back
                shutil.rmtree(os.path.join(self.ds_dir, tag), ignore_errors=True)
                os.replace(aside, os.path.join(self.ds_dir, tag))
        for pattern in ("*.tmp.*", "ds/*.tmp.*", "ds/*/*.tmp.*"):
            for p in glob.glob(os.path.join(self.path, pattern)):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)

    # ---- which checkpoint to resume ------------------------------------------------------------------
    def tags(self) -> List[str]:
        if not os.path.isdir(self.ds_dir):
            return []
        return sorted(d for d in os.listdir(self.ds_dir)
                      if d.startswith("step_") and os.path.isdir(os.path.join(self.ds_dir, d)))

    def check_tag(self, tag: str) -> Optional[str]:
        """None if ``tag`` is complete (its manifest matches the files on disk), else what is wrong."""
        folder = os.path.join(self.ds_dir, tag)
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return "it has no manifest (the save did not finish)"
        for name, size in manifest.get("files", {}).items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return f"{name} is missing"
            if os.path.getsize(path) != size:
                return f"{name} has {os.path.getsize(path)} bytes, the manifest says {size} (truncated)"
        return None

    def resume_tag(self) -> Tuple[Optional[str], Optional[str]]:
        """(newest complete tag or None, a note on any newer tag that was skipped and why)."""
        notes = []
        for tag in reversed(self.tags()):
            problem = self.check_tag(tag)
            if problem is None:
                note = None
                if notes:
                    note = f"{'; '.join(notes)}: resuming from the older complete checkpoint {tag}"
                return tag, note
            notes.append(f"checkpoint {tag} in {self.ds_dir} is incomplete ({problem})")
        return None, ("; ".join(notes) + ": starting from step 0 (nothing deleted)") if notes else None

    def latest_complete_step(self) -> Optional[int]:
        tag, _ = self.resume_tag()
        return int(tag.split("_")[1]) if tag else None

    def saved_config(self) -> Optional[dict]:
        try:
            with open(self.config_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # ---- save / load -----------------------------------------------------------------------------------
    def save(self, engine, step: int, *, client: dict, rng: dict, info, keep: int, export: Callable) -> None:
        """Every rank writes its part of tag ``step``; then rank 0 writes the manifest, ``latest``, the weights
        file, and prunes old tags. A failure on any rank (disk full) leaves the previous tags untouched."""
        from engine.distributed import barrier

        tag = ds_tag(step)
        folder = os.path.join(self.ds_dir, tag)
        # a tag saved again (a run resumed at its last step): the old one is set aside, not overwritten file by
        # file (saved by another number of ranks it would keep files the new save does not write), and removed
        # once the new one is complete
        aside = f"{folder}.replaced.tmp.{os.getpid()}"
        if info.is_main and os.path.isdir(folder):
            os.replace(folder, aside)
        barrier()
        error = None
        try:
            # universal_checkpoint_info (empty: no tensor parallelism to describe) lets DeepSpeed's ds_to_universal
            # convert the tag for another number of ranks (:meth:`universal`)
            engine.save_checkpoint(self.ds_dir, tag=tag, save_latest=False,
                                   client_state={"step": step, "client": client, UNIVERSAL_INFO: {}})
            atomic_save(rng, os.path.join(folder, f"rng_rank_{info.rank:05d}.pt"))
        except (OSError, RuntimeError, CheckpointError) as e:
            error = e
        if _all_ok(error is None) and info.is_main:
            try:
                files = {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
                         if n != MANIFEST and ".tmp." not in n}
                atomic_write_json(os.path.join(folder, MANIFEST),
                                  {"step": step, "world_size": info.world_size,
                                   "zero_stage": engine.zero_optimization_stage(), "files": files})
                atomic_write(os.path.join(self.ds_dir, "latest"), lambda tmp: open(tmp, "w").write(tag))
                export(self.weights)
                self.prune(keep)
            except (OSError, CheckpointError) as e:
                error = e
        ok = _all_ok(error is None)
        barrier()
        if info.is_main and os.path.isdir(aside):
            if not ok:  # the failed save's partial tag goes, the one set aside comes back
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(aside, folder)
            else:
                shutil.rmtree(aside, ignore_errors=True)
        if not ok:
            if info.is_main and self.check_tag(tag) is not None:
                shutil.rmtree(folder, ignore_errors=True)  # a partial tag of this failed save only
            if isinstance(error, CheckpointError):
                raise error
            sizes = [sum(os.path.getsize(p) for p in glob.glob(os.path.join(self.ds_dir, t, "*")))
                     for t in self.tags() if self.check_tag(t) is None]
            need = f"about {max(sizes) / 2**20:.0f} MiB" if sizes else "as much as the model and optimizer states"
            full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise CheckpointError(f"{'disk full: ' if full else ''}writing checkpoint {tag} to {self.ds_dir} failed "
                                  f"({error or 'on another rank'}); a checkpoint needs {need}: free space there "
                                  f"(df -h {self.path}) or pass another --out; the previous complete checkpoint is "
                                  f"intact and a rerun resumes from it")

    def manifest(self, tag: str) -> dict:
        with open(os.path.join(self.ds_dir, tag, MANIFEST)) as f:
            return json.load(f)

    def universal(self, tag: str, info) -> str:
        """Tag ``tag`` in DeepSpeed's universal layout (``ds/<tag>/universal/``: every parameter's fp32 weights
        and AdamW moments whole, one folder per parameter), which loads on any number of ranks. Converted once
        by the main rank with DeepSpeed's ``ds_to_universal`` (reading with ``weights_only=True``), written
        under a temporary name and renamed; every rank returns the folder."""
        from engine.distributed import barrier

        out = os.path.join(self.ds_dir, tag, UNIVERSAL_DIR)
        error = None
        if info.is_main and not os.path.isdir(out):
            try:
                convert_to_universal(os.path.join(self.ds_dir, tag), out)
            except Exception as e:  # noqa: BLE001: any failure becomes one line, on every rank
                error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if not _all_ok(error is None):
            raise CheckpointError(f"converting {os.path.join(self.ds_dir, tag)} for another number of ranks failed "
                                  f"({error or 'see the main rank'}): resume on the "
                                  f"{self.manifest(tag).get('world_size')} ranks that saved it")
        barrier()
        return out

    def load(self, engine, tag: str, info, universal: bool = False) -> dict:
        """Load tag into the DeepSpeed engine; returns {step, client, rng} for this rank (rng None when the tag
        was saved by another number of ranks: ``universal``, loaded from :meth:`universal`'s folder)."""
        folder = os.path.join(self.ds_dir, tag)
        saved_ranks = self.manifest(tag).get("world_size")
        if saved_ranks != info.world_size and not universal and engine.zero_optimization_stage() > 0:
            raise CheckpointError(f"{folder} was saved by {saved_ranks} ranks, this run has {info.world_size}: "
                                  f"the engine was not built to load DeepSpeed's universal checkpoint")
        load_dir, load_tag = (folder, UNIVERSAL_DIR) if universal else (self.ds_dir, tag)
        try:
            with safe_torch_load():
                path, client = engine.load_checkpoint(load_dir, tag=load_tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
            rng = None if saved_ranks != info.world_size else safe_load(
                os.path.join(folder, f"rng_rank_{info.rank:05d}.pt"))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"cannot load checkpoint {folder} ({type(e).__name__}: {first}); it is corrupt "
                                  f"or holds code (never unpickled): move it out of {self.ds_dir} to resume from "
                                  f"the previous one, or pass --fresh") from None
        if path is None or client is None:
            raise CheckpointError(f"{folder} could not be loaded by DeepSpeed: move it aside or pass --fresh")
        task_state = client["client"]
        if saved_ranks != info.world_size:  # ZeRO-3: each saved rank's client state holds its own slices
            files = sorted(glob.glob(os.path.join(folder, "zero_pp_rank_*_mp_rank_00_model_states.pt")),
                           key=lambda p: int(os.path.basename(p).split("_")[3]))
            if files:
                with safe_torch_load():
                    task_state = dict(task_state, ranks=[torch.load(p, map_location="cpu")["client"] for p in files])
        return {"step": int(client["step"]), "client": task_state, "rng": rng}

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` complete tags (never the only complete one)."""
        complete = [t for t in self.tags() if self.check_tag(t) is None]
        for tag in complete[:-max(1, keep)]:
            shutil.rmtree(os.path.join(self.ds_dir, tag), ignore_errors=True)

    # ---- a fresh start -----------------------------------------------------------------------------------
    def move_aside(self) -> Optional[str]:
        """Move an older run's files into ``previous/<time>/`` (a fresh start deletes nothing)."""
        present = [n for n in self.MOVABLE if os.path.exists(os.path.join(self.path, n))]
        if not present:
            return None
        dest = os.path.join(self.path, "previous", time.strftime("%Y%m%d-%H%M%S"))
        while os.path.exists(dest):
            dest += "_"
        os.makedirs(dest)
        for n in present:
            os.replace(os.path.join(self.path, n), os.path.join(dest, n))
        return dest

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)
