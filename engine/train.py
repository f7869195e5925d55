"""IWM pretraining: ``train(cfg)`` runs :class:`engine.pretrain.Pretraining` on the run core.

The step itself is :func:`engine.pretrain.pretrain_step`; the loop, checkpoints, resume and logs are
:class:`engine.run.Run`.
"""
from __future__ import annotations

import logging
from typing import Optional

from engine.config import IWMConfig
from engine.distributed import DistInfo, setup_distributed
from engine.pretrain import Pretraining
from engine.run import Run, RunResult

TrainResult = RunResult


def train(cfg: IWMConfig, dist_info: Optional[DistInfo] = None) -> RunResult:
    """Pretrain an IWM as ``cfg`` says, in ``cfg.train.out_dir`` (resuming there when it holds a checkpoint)."""
    cfg.validate()
    info = dist_info or setup_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return Run(cfg, info).fit(Pretraining(cfg, info.device, info.rank))
