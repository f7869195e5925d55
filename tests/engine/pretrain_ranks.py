"""Pretrain the tiny recipe with overrides, without the recipe's closing linear probe (for tests that run it on
several ranks), one run or several in turn in the same processes (the imports and the rendezvous once):

    deepspeed --num_gpus N tests/engine/pretrain_ranks.py OUT STEPS SECTION.FIELD=VALUE ... [--then OUT STEPS ...]

(or the ranks started by tests.helpers.run_ranks)."""
import os
import sys

from engine.config import load_recipe
from engine.pretrain import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runs(argv):
    """[(out, steps, overrides)] from OUT STEPS SET... [--then OUT STEPS SET...]."""
    found, current = [], []
    for a in argv + ["--then"]:
        if a == "--then":
            found.append((current[0], int(current[1]), current[2:]))
            current = []
        else:
            current.append(a)
    return found


if __name__ == "__main__":
    for out, steps, overrides in runs([a for a in sys.argv[1:] if not a.startswith("--local_rank")]):
        cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_tiny.py"), overrides)
        cfg.train.out_dir, cfg.optim.max_steps = out, steps
        pretrain(cfg.validate())
