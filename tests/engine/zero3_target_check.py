"""Run on two ranks by tests/engine/test_zero3_target.py (``deepspeed --num_gpus 2 THIS OUT.json``).

Builds the tiny pretraining task at ZeRO-3 and at ZeRO-1 in this process, trains a few steps, and writes what
the engine does with the EMA target encoder for the test to compare with an unpartitioned reference and with
engine.plan:

* ``exact``: after every update, the gathered partitioned target equals a whole fp32 copy updated by a plain
  loop from the gathered online encoder (``torch.equal``, every parameter), and its forward equals the copy's;
* ``target_bytes``: the bytes of target-encoder parameters this rank holds between steps (its flat buffer),
  at each stage; ``peak_gathered_bytes``: the most target bytes whole at once during its forward (ZeRO-3);
* ``plan_ema`` / ``plan_target_gather``: engine.plan's figures for the same config, stage and world size.
"""
import contextlib
import copy
import json
import sys

import torch

from engine.config import IWMConfig
from engine.distributed import gathered, setup_distributed
from engine.plan import PRECISIONS, param_counts, persistent_bytes, target_gather_bytes
from engine.pretrain import Pretraining
from engine.run import Run
from tests.helpers import TINY

STEPS, MOMENTUM = 3, 0.9


def config(stage: int) -> IWMConfig:
    cfg = IWMConfig(name="zero3_target")
    for a in TINY + [f"train.zero_stage={stage}", "train.out_dir='/tmp/unused'"]:
        cfg.override(a)
    return cfg.validate()


def live_elements(module) -> int:
    """Elements of ``module``'s parameters whole on this rank now (ZeRO-3: gathered and not released)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in module.parameters()
               if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE)


@contextlib.contextmanager
def peak_live(module, stage: int):
    """Within: the most target elements whole at once while a submodule's forward starts (ZeRO-3)."""
    peak = [0]
    if stage != 3:
        yield peak
        return

    def hook(*_):
        peak[0] = max(peak[0], live_elements(module))

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()]
    try:
        yield peak
    finally:
        for h in handles:
            h.remove()


def check(stage: int, info) -> dict:
    cfg = config(stage)
    task = Pretraining(cfg, info.device, info.rank)
    reference = copy.deepcopy(task.target_encoder.module)  # whole, fp32, updated by a plain loop
    engine = Run(cfg, info).build_engine(task)
    online = list(task.model.encoder.parameters())
    gen = torch.Generator().manual_seed(100 + info.rank)
    exact, peak_gathered, live_between = True, 0, 0
    for _ in range(STEPS):
        if stage == 3:  # what stays whole between one step's target forward and the next
            live_between = max(live_between, live_elements(task.target_encoder.module))
        images = torch.rand(cfg.data.batch_size, 3, cfg.data.img_size, cfg.data.img_size, generator=gen)
        out = task.step(engine, images, torch.zeros(cfg.data.batch_size, dtype=torch.long), contextlib.nullcontext)
        engine.backward(out.loss)
        engine.step()
        task.target_encoder.update(MOMENTUM)
        with torch.no_grad(), gathered(online):
            for t, o in zip(reference.parameters(), online):
                t.mul_(MOMENTUM).add_(o.detach().float(), alpha=1 - MOMENTUM)
        with task.target_encoder.whole() as target, torch.no_grad():
            exact &= all(torch.equal(a, b) for a, b in zip(target.parameters(), reference.parameters()))
        with torch.no_grad(), peak_live(task.target_encoder.module, stage) as live:
            feats = task.target_encoder(images)
        peak_gathered = max(peak_gathered, live[0])
        with torch.no_grad():
            exact &= torch.equal(feats, reference(images))
    counts = param_counts(cfg)
    plan_ema = persistent_bytes(cfg, stage, info.world_size, PRECISIONS["fp32"], counts["trainable"],
                                counts["target_encoder"])[3]
    return {"exact": bool(exact), "target_bytes": task.target_encoder.buffer.flat.numel() * 4,
            "target_params": counts["target_encoder"], "plan_ema": plan_ema,
            "peak_gathered_bytes": 4 * peak_gathered, "whole_between_steps_bytes": 4 * live_between,
            "plan_target_gather": target_gather_bytes(cfg, stage, info.world_size)}


def main(out: str) -> None:
    info = setup_distributed()
    result = {str(stage): check(stage, info) for stage in (3, 1)}
    gathered_results = [None] * info.world_size
    torch.distributed.all_gather_object(gathered_results, result)
    if info.is_main:
        with open(out, "w") as f:
            json.dump(gathered_results, f, indent=2)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
