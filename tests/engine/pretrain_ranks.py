"""Pretrain the tiny recipe with overrides, without the recipe's closing linear probe (for tests that launch it
on several ranks): ``deepspeed --num_gpus N tests/engine/pretrain_ranks.py OUT STEPS SECTION.FIELD=VALUE ...``."""
import os
import sys

from engine.config import load_recipe
from engine.pretrain import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    out, steps, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_tiny.py"), overrides)
    cfg.train.out_dir, cfg.optim.max_steps = out, int(steps)
    pretrain(cfg.validate())
