"""The target encoder: an exponential moving average of the online encoder, fp32, no gradient.

The update runs through ``kernels.ema`` (one multi-tensor / flat-buffer pass instead of a Python loop
over parameters).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels.ema import ema_update_


def ema_pairs(target: nn.Module, online: nn.Module):
    """Matching (target, online) parameter lists; the two modules must have the same structure."""
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        missing = sorted(set(t_params) ^ set(o_params))[:5]
        raise ValueError(f"target and online encoders differ in parameters, e.g. {missing}")
    names = sorted(t_params)
    return [t_params[n] for n in names], [o_params[n] for n in names]


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter."""
    t, o = ema_pairs(target, online)
    ema_update_(t, o, momentum)
