"""The target encoder: an exponential moving average of the online encoder, fp32, no gradient.

The update runs through ``kernels.ema``: with the target encoder's parameters in one flat fp32 buffer
(``engine.models.make_target_encoder``), one kernel launch on CUDA (multi-tensor lerp on CPU) instead of
a Python loop over parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels.ema import ema_update_, ema_update_flat_


def ema_pairs(target: nn.Module, online: nn.Module):
    """Matching (target, online) parameter lists, in the target's parameter order; the two modules
    must have the same structure."""
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        missing = sorted(set(t_params) ^ set(o_params))[:5]
        raise ValueError(f"target and online encoders differ in parameters, e.g. {missing}")
    names = [n for n, _ in target.named_parameters()]
    return [t_params[n] for n in names], [o_params[n] for n in names]


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter."""
    cached = getattr(target, "_ema_cache", None)
    if cached is None or cached[0] is not online:
        t, o = ema_pairs(target, online)
        flat = getattr(target, "flat_params", None)
        same_order = flat is not None and len(flat.params) == len(t) and all(a is b for a, b in zip(flat.params, t))
        flat = flat if same_order and flat.is_intact() else None
        cached = (online, t, o, flat)
        target._ema_cache = cached  # plain attribute: the pairing is fixed once both modules exist
    _, t, o, flat = cached
    if flat is not None:
        ema_update_flat_(flat.flat, o, momentum)  # the buffer's order is the target's parameter order
    else:
        ema_update_(t, o, momentum)
