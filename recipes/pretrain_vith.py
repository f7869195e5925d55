"""IWM ViT-H/14 pretraining on ImageNet-1k (I-JEPA ViT-H/14 optimisation, PAPER.md), on GPU nodes.

    deepspeed --num_gpus 8 recipes/pretrain_vith.py --data /datasets/imagenet/train
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 recipes/pretrain_vith.py --data ...

Batch 128 per GPU (x 16 GPUs = 2048), bf16 autocast, 300 epochs, predictor Equi 36 x 512.
"""
import sys

from engine.cli import run_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    # data (224 px, batch 128 per GPU), optimisation (300 epochs, warmup 40, lr 2e-4 -> 1e-3 -> 1e-6,
    # wd 0.04 -> 0.4, EMA 0.996 -> 1.0) and bf16 autocast on CUDA are the config defaults (engine/config.py)
    cfg = IWMConfig(name="pretrain_vith14")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.data.num_workers = 10
    cfg.model.encoder, cfg.model.patch_size = "vit_huge", 14
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 36, 512, 16
    cfg.train.out_dir = "runs/pretrain_vith14"
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 5000, 2500
    return cfg

if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
