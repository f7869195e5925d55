"""The EMA target encoder (docs/method.md, "EMA target encoder").

:class:`TargetEncoder` owns a frozen fp32 copy of the online encoder, the flat buffer its parameters live
in, and the pairing of each of its parameters with the online encoder's, so the update
``target <- m * target + (1 - m) * online`` is one call (one kernel launch on CUDA, ``kernels/ema.py``).
The target encoder is never trained and never given to the optimizer; it runs in eval mode.

Under ZeRO-3 (:meth:`TargetEncoder.partition`) the target encoder is partitioned like the online encoder:
DeepSpeed's ZeRO-3 (an engine without optimizer) splits every parameter over the ranks by the same rule
(its elements, padded to a multiple of the world size, in equal consecutive slices), so rank r's slice of
a target parameter pairs element for element with rank r's slice of the online one. The flat buffer then
holds this rank's slices only (4 bytes per parameter / world size), each rank updates its own slices from
the online partitions it already holds (no communication), and the target's forward gathers its
parameters module by module as ZeRO-3 gathers the online encoder's. With the target replicated, the update
all-gathered the online shards every step; now nothing is gathered for the update, and the forward
gathers the target's shards instead (the same bytes, fp32).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from engine.distributed import gathered
from kernels.ema import FlatBuffer, ema_update_flat_

SHARD = "target_encoder_shard"  # this rank's slices, in a ZeRO-3 checkpoint's per-rank client state


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
        self._engine = None  # ZeRO-3: the DeepSpeed engine (no optimizer) that partitions the target

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    @property
    def flat(self) -> torch.Tensor:
        """All target parameters as one contiguous fp32 vector (parameter order)."""
        return self.buffer.flat

    @property
    def partitioned(self) -> bool:
        return self._engine is not None

    def partition(self, micro_batch: int) -> None:
        """ZeRO-3: partition the target's parameters over the ranks (every one of them: no persistence
        threshold, so every slice pairs with an online slice) and re-home this rank's slices into the flat
        buffer. Call after DeepSpeed has partitioned the online encoder."""
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": micro_batch, "steps_per_print": 10 ** 9,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        self._engine, _, _, _ = deepspeed.initialize(model=self.module, config=config)
        self._engine.eval()
        self.buffer = FlatBuffer([p.ds_tensor for p in self.module.parameters()])
        for p, o in zip(self.module.parameters(), self._online_params):
            if p.ds_tensor.numel() != o.ds_tensor.numel():
                raise RuntimeError(f"target and online partitions differ ({p.ds_tensor.numel()} vs "
                                   f"{o.ds_tensor.numel()} elements): partition both over the same ranks")

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, every parameter, fp32 arithmetic (partitioned:
        this rank's slices, from the online encoder's slices on this rank)."""
        if not self.buffer.is_intact():
            raise RuntimeError("the target encoder's parameters were re-homed away from its flat buffer "
                               "(e.g. by .to() or load_state_dict(assign=True)); use load_state_dict()")
        if self.partitioned:
            ema_update_flat_(self.buffer.flat, [p.ds_tensor.detach() for p in self._online_params], momentum)
            return
        with gathered(self._online_params):  # ZeRO-3 online only: its shards, gathered read-only
            ema_update_flat_(self.buffer.flat, [p.detach() for p in self._online_params], momentum)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole target's state dict; partitioned: ``{SHARD: this rank's slices}`` (what a checkpoint's
        per-rank client state holds)."""
        if self.partitioned:
            return {SHARD: self.buffer.flat.clone()}
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor], shards: Optional[List[torch.Tensor]] = None) -> None:
        """A whole state dict, or ``{SHARD: ...}`` of this rank saved on the same number of ranks, or the
        ``shards`` of every rank of a save on another number of ranks (re-partitioned here)."""
        if shards is not None:
            state = self.merge_shards(shards)
        if SHARD in state:
            if not self.partitioned or state[SHARD].numel() != self.buffer.numel:
                raise RuntimeError("a partitioned target encoder's slices only load into the same partition")
            self.buffer.flat.copy_(state[SHARD])
        elif self.partitioned:
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            full = dict(self.module.named_parameters())
            with torch.no_grad():
                for name, p in full.items():
                    p.ds_tensor.copy_(slice_of(state[name].reshape(-1).float(), world, rank))
        else:
            self.module.load_state_dict(state)  # copies into the buffer's views in place

    def merge_shards(self, shards: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The whole parameters from every rank's flat slices of a save on ``len(shards)`` ranks."""
        world, out, offset = len(shards), {}, 0
        for name, p in self.module.named_parameters():
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            per = -(-numel // world)
            out[name] = torch.cat([s[offset:offset + per] for s in shards])[:numel].view(p.ds_shape
                                                                                     if hasattr(p, "ds_shape")
                                                                                     else p.shape)
            offset += per
        return out

    @contextlib.contextmanager
    def whole(self):
        """A context in which the target's parameters are whole on every rank (a gather when partitioned)."""
        with gathered(self.module.parameters()):
            yield self.module

    def parameters(self):
        return self.module.parameters()


def slice_of(flat: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 slice of a parameter's elements ``flat`` (zero-padded to a multiple of ``world``)."""
    per = -(-flat.numel() // world)
    padded = torch.zeros(per * world, dtype=flat.dtype)
    padded[:flat.numel()] = flat
    return padded[rank * per:(rank + 1) * per]
