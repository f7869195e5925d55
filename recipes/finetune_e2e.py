"""End-to-end finetuning: encoder + pretrained predictor + attentive head, all trained ("end-to-end").

    deepspeed --num_gpus 8 recipes/finetune_e2e.py --ckpt runs/pretrain_vitb16_equi \
        --data /datasets/imagenet/train --val /datasets/imagenet/val
    python recipes/finetune_e2e.py --smoke --ckpt runs/smoke/pretrain_tiny

As encoder FT (layer-wise LR decay 0.65 on the encoder, stochastic depth 0.1 in both ViTs, mixup /
cutmix, RandAugment, label smoothing), with the predictor on every position under the identity action
at 1/10 of the head's LR.
"""
import sys

from engine.cli import run_finetune_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    cfg = IWMConfig(name="finetune_e2e")
    cfg.finetune.checkpoint = "runs/pretrain_vitb16_equi"
    cfg.finetune.protocol = "end_to_end"
    cfg.data.dataset = "data/imagenet/train"
    cfg.data.batch_size = 128
    cfg.optim.epochs, cfg.optim.warmup_epochs = 100, 5
    cfg.optim.start_lr, cfg.optim.lr, cfg.optim.final_lr = 1e-6, 2e-3, 1e-6
    cfg.optim.weight_decay = cfg.optim.final_weight_decay = 0.05
    cfg.train.out_dir = "runs/finetune_e2e"
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 2500, 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_finetune_recipe(config, __doc__))
