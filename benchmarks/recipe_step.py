"""A recipe's pretraining step as the engine runs it, for the benchmarks that time or size one.

:func:`build` makes what ``engine.pretrain.pretrain`` makes for a config (this process's rank, the kernel and
attention backends, the :class:`engine.run.Run`, the Pretraining task and its DeepSpeed engine) without a data
set or a run directory that outlives it; :func:`step` runs one optimizer step of
:meth:`engine.run.Run.optimizer_step` (views + action, masks, EMA target encoder, encoder + predictor, loss,
backward, AdamW, EMA update) on given uint8 images. Used by ``benchmarks/gpu_check.py`` (30 timed steps per
backend pair) and ``benchmarks/full_size.py`` (one step at each recipe's real size).
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

import torch

from benchmarks.common import ROOT


@dataclass
class Built:
    cfg: object
    run: object
    task: object
    engine: object
    sched: object
    meters: object


def load_config(recipe: str, sets=()):
    """A recipe file's ``config()`` (path relative to the repository root) with ``section.field=value`` sets."""
    from engine.config import load_recipe

    return load_recipe(os.path.join(ROOT, recipe), list(sets)).validate()


def build(cfg, dist_info=None) -> Built:
    """This rank's process group, the backends of ``cfg.train``, the Run, the Pretraining task and the engine."""
    from engine.pretrain import Pretraining
    from engine.run import Meters, Run, Schedule, start_process
    from kernels import dispatch

    info = start_process(dist_info)
    dispatch.configure(kernels=cfg.train.kernels, attention=cfg.train.attention)
    run, task = Run(cfg, info), Pretraining(cfg, info.device, info.rank)
    engine = run.build_engine(task)
    sched = Schedule(total=10 ** 6, warmup=1000, steps_per_epoch=1000)
    return Built(cfg, run, task, engine, sched, Meters(run.device))


def random_images(cfg, n: int = 2, seed: int = 0) -> torch.Tensor:
    """[n, B, 3, H, W] uint8 noise images at the config's size (the step's cost does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    s = cfg.data.img_size
    return torch.randint(0, 256, (n, cfg.data.batch_size, 3, s, s), generator=gen, dtype=torch.uint8)


def step(built: Built, images: torch.Tensor, i: int) -> None:
    """Optimizer step ``i`` on batch ``images[i % len(images)]`` (no host sync)."""
    labels = torch.zeros(images.shape[1], dtype=torch.long)
    built.run.optimizer_step(built.engine, built.task, i, [(images[i % len(images)], labels)], built.sched,
                             built.meters)


def tokens_per_image(built: Built) -> dict:
    """Mean context / target tokens per image over the steps run so far."""
    m = built.meters
    return {k: v / max(1, m.images) for k, v in m.tokens.items()}


def run_group(cmd: list, env: dict, timeout: int, port=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a launcher, or one rank) in a process group of its own, output captured. On a timeout the
    whole group is stopped (ranks, compile workers), the launch's DeepSpeed /dev/shm buffers on ``port`` removed,
    and TimeoutExpired raised."""
    from engine.distributed import remove_shm_buffers

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if port is not None:
            remove_shm_buffers(port)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
