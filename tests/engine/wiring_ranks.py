"""One rank of ``test_wiring.py``'s accumulation test, started by the ``deepspeed`` launcher:

    deepspeed --num_gpus 2 tests/engine/wiring_ranks.py OUT STEPS [SECTION.KEY=VALUE ...]

runs the tiny pretraining config (tests/helpers.py) for STEPS optimizer steps in OUT with spies on the task's
step (one call per micro-batch forward) and on torch AdamW's step (the update DeepSpeed applies; the event
names the number of parameter groups it updated), and writes
what they saw, with the DeepSpeed engine's own accumulation and batch sizes, to OUT/spy_rank{R}.json."""
import json
import os
import sys

import torch

import engine.pretrain as P
from engine.run import Run
from tests.helpers import tiny_config


def main(out: str, steps: int, overrides: list) -> None:
    seen = {"events": [], "batches": []}
    engines = []
    real_build, real_step, real_update = Run.build_engine, P.Pretraining.step, torch.optim.AdamW.step

    def build_engine(self, task):
        seen["param_groups"] = len(task.param_groups(0.0))
        engines.append(real_build(self, task))
        return engines[-1]

    def step(self, engine, images, labels, autocast):
        seen["events"].append("forward")
        seen["batches"].append(int(images.shape[0]))
        return real_step(self, engine, images, labels, autocast)

    def update(self, *a, **k):  # ZeRO 1-2 call it once per parameter group, each time with that group alone
        seen["events"].append(f"step {len(self.param_groups)}")
        return real_update(self, *a, **k)

    Run.build_engine, P.Pretraining.step, torch.optim.AdamW.step = build_engine, step, update
    result = P.pretrain(tiny_config(out, steps, overrides))
    engine = engines[0]
    seen.update(world_size=torch.distributed.get_world_size(), result_step=result.step,
                gradient_accumulation_steps=engine.gradient_accumulation_steps(),
                train_batch_size=engine.train_batch_size(),
                train_micro_batch_size_per_gpu=engine.train_micro_batch_size_per_gpu(),
                global_steps=engine.global_steps)
    with open(os.path.join(out, f"spy_rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], int(args[1]), args[2:])
