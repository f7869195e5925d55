"""Encoder finetuning (no predictor) of a pretrained IWM on ImageNet-1k: the paper's "encoder FT" column.

    deepspeed --num_gpus 8 recipes/finetune_encoder.py --ckpt runs/pretrain_vitb16_equi \
        --data /datasets/imagenet/train --val /datasets/imagenet/val
    python recipes/finetune_encoder.py --smoke --ckpt runs/smoke/pretrain_tiny      # seconds on CPU

MAE / BEiT ViT-B/16 finetuning: 100 epochs, batch 1024, AdamW lr 2e-3 (5e-4 x 1024 / 256), weight decay
0.05, 5 warmup epochs, layer-wise LR decay 0.65, stochastic depth 0.1, RandAugment m9, mixup 0.8 /
cutmix 1.0, label smoothing 0.1 (engine/config.py FinetuneConfig); the attentive head.
"""
import sys

from engine.cli import run_finetune_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    cfg = IWMConfig(name="finetune_encoder")
    cfg.finetune.checkpoint = "runs/pretrain_vitb16_equi"  # pass --ckpt for another pretraining run
    cfg.finetune.protocol = "encoder"
    cfg.data.dataset = "data/imagenet/train"  # pass --data / --val to point at your copy
    cfg.data.batch_size = 128  # x 8 GPUs = 1024
    cfg.optim.epochs, cfg.optim.warmup_epochs = 100, 5
    cfg.optim.start_lr, cfg.optim.lr, cfg.optim.final_lr = 1e-6, 2e-3, 1e-6
    cfg.optim.weight_decay = cfg.optim.final_weight_decay = 0.05
    cfg.train.out_dir = "runs/finetune_encoder"
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 2500, 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_finetune_recipe(config, __doc__))
