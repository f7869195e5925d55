"""The EMA target encoder (docs/method.md, "EMA target encoder").

:class:`TargetEncoder` owns a frozen fp32 copy of the online encoder, the flat buffer its parameters live
in, and the pairing of each of its parameters with the online encoder's, so the update
``target <- m * target + (1 - m) * online`` is one call (one kernel launch on CUDA, ``kernels/ema.py``).
The target encoder is never trained and never given to the optimizer; it runs in eval mode.

Under ZeRO-3 the online encoder is partitioned but the target encoder stays whole (replicated, fp32) on
every rank: its forward needs every weight at every step, so partitioning it would add one all-gather of
it per step (4 bytes per parameter over the network) to save 4 bytes per parameter of memory per GPU. The
update gathers the online shards (read-only, no ``modifier_rank``: nothing is written back into them)
and every rank applies the same fp32 update to its own copy, so the copies stay identical.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn as nn

from engine.distributed import gathered
from kernels.ema import FlatBuffer, ema_update_flat_


class TargetEncoder:
    """The target encoder of ``online``: ``target(images) -> [B, N, D]`` features, ``update(momentum)``.

    ``online`` is the encoder the optimizer trains (the same module object DeepSpeed wraps); its
    parameters are paired by name once, here, and read afresh at every update (DeepSpeed may re-home
    their storage). The copy is fp32 on ``device`` whatever the online dtype.
    """

    def __init__(self, online: nn.Module, device=None):
        self.online = online
        self.module = copy.deepcopy(online).to(device=device, dtype=torch.float32).eval()
        self.module.requires_grad_(False)
        names = [n for n, _ in self.module.named_parameters()]
        online_params = dict(online.named_parameters())
        if names != list(online_params):
            raise ValueError("target and online encoders differ in parameters: "
                             f"{sorted(set(names) ^ set(online_params))[:5]}")
        self._online_params: List[nn.Parameter] = [online_params[n] for n in names]
        self.buffer = FlatBuffer(self.module.parameters())  # the copy's parameters become views of one buffer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    @property
    def flat(self) -> torch.Tensor:
        """All target parameters as one contiguous fp32 vector (parameter order)."""
        return self.buffer.flat

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, every parameter, fp32 arithmetic."""
        if not self.buffer.is_intact():
            raise RuntimeError("the target encoder's parameters were re-homed away from its flat buffer "
                               "(e.g. by .to() or load_state_dict(assign=True)); use load_state_dict()")
        with gathered(self._online_params):  # ZeRO-3: the online shards, gathered read-only for the update
            ema_update_flat_(self.buffer.flat, [p.detach() for p in self._online_params], momentum)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)  # copies into the buffer's views in place

    def parameters(self):
        return self.module.parameters()
