"""IWM pretraining: ``train(cfg)`` runs :class:`engine.pretrain.Pretraining` on the run core.

The step itself is :func:`engine.pretrain.pretrain_step`; the loop, checkpoints, resume and logs are
:class:`engine.run.Run`.
"""
from __future__ import annotations

from typing import Optional

from engine.config import IWMConfig
from engine.distributed import DistInfo
from engine.pretrain import Pretraining
from engine.run import Run, RunResult, start_process

TrainResult = RunResult


def train(cfg: IWMConfig, dist_info: Optional[DistInfo] = None) -> RunResult:
    """Pretrain an IWM as ``cfg`` says, in ``cfg.train.out_dir`` (resuming there when it holds a checkpoint)."""
    cfg.validate()
    info = start_process(dist_info)
    return Run(cfg, info).fit(Pretraining(cfg, info.device, info.rank))
