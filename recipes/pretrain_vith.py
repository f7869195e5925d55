"""IWM ViT-H/14 pretraining on ImageNet-1k (I-JEPA ViT-H/14 optimisation, PAPER.md), on GPU nodes.

    deepspeed --num_gpus 8 recipes/pretrain_vith.py --data /datasets/imagenet/train
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 recipes/pretrain_vith.py --data ...

Batch 128 per GPU (x 16 GPUs = 2048), bf16 autocast, 300 epochs, predictor Equi 36 x 512.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_recipe  # noqa: E402
from engine.config import IWMConfig  # noqa: E402


def config() -> IWMConfig:
    cfg = IWMConfig(name="pretrain_vith14")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.data.img_size = 224
    cfg.data.batch_size = 128
    cfg.data.num_workers = 10
    cfg.model.encoder, cfg.model.patch_size = "vit_huge", 14
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 36, 512, 16
    cfg.model.conditioning = "feature"
    cfg.optim.epochs, cfg.optim.warmup_epochs = 300, 40
    cfg.optim.start_lr, cfg.optim.lr, cfg.optim.final_lr = 2e-4, 1e-3, 1e-6
    cfg.optim.weight_decay, cfg.optim.final_weight_decay = 0.04, 0.4
    cfg.optim.ema = (0.996, 1.0)
    cfg.train.out_dir = "runs/pretrain_vith14"
    cfg.train.zero_stage = 1
    cfg.train.precision = "auto"  # bf16 autocast on CUDA
    cfg.train.log_every = 50
    cfg.train.eval_every = 5000
    cfg.train.ckpt_every = 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
