"""What every recipe shares: argument parsing (DeepSpeed launcher flags included), config overrides,
clear errors for bad input, and the closing summary."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

from engine.config import ConfigError, IWMConfig


def recipe_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    # the DeepSpeed launcher appends --local_rank=N (torchrun sets LOCAL_RANK instead)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None,
                   help="ImageNet-style folder of class subfolders (default: the recipe's, often 'embedded')")
    p.add_argument("--out", default=None, help="run directory (train.out_dir)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (optim.max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set model.conditioning=none (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the run directory")
    return p


def apply_args(cfg: IWMConfig, args: argparse.Namespace) -> IWMConfig:
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if args.data:
        cfg.data.dataset = args.data
    if args.out:
        cfg.train.out_dir = args.out
    if args.steps is not None:
        cfg.optim.max_steps = args.steps  # validate() refuses 0 or less
    if args.fresh:
        cfg.train.resume = False
    for assignment in args.set:
        cfg.override(assignment)
    return cfg.validate()


def run_recipe(build: Callable[[], IWMConfig], description: str, argv: Optional[List[str]] = None,
               after: Optional[Callable] = None) -> int:
    """Build the recipe's config, apply command-line overrides, pretrain, print where everything is."""
    from engine.checkpoint import CheckpointError
    from engine.data import DataError

    args = recipe_parser(description).parse_args(argv)
    try:
        cfg = apply_args(build(), args)
        from engine.train import chance_mrr, train

        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nfinal loss {result.final_loss:.4f} (first logged {result.first_loss:.4f}) after {result.step} steps")
        print(f"final MRR {result.mrr:.4f} ({cfg.eval.mrr_candidates} candidates, chance "
              f"{chance_mrr(cfg.eval.mrr_candidates):.4f}, conditioning={cfg.model.conditioning})")
        print(f"checkpoint: {result.checkpoint}")
        print(f"logs:       {result.metrics_csv}  (TensorBoard: {os.path.join(result.out_dir, 'tensorboard')})")
        print(f"plot:       {result.plot}")
        if after is not None:
            after(cfg, result)
    return 0
