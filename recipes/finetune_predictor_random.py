"""The paper's control for predictor finetuning: the frozen encoder with a randomly initialised predictor
(same architecture, same everything else, the predictor at the full LR): "frozen enc + random pred".

    deepspeed --num_gpus 8 recipes/finetune_predictor_random.py --ckpt runs/pretrain_vitb16_equi \
        --data /datasets/imagenet/train --val /datasets/imagenet/val
    python recipes/finetune_predictor_random.py --smoke --ckpt runs/smoke/pretrain_tiny
"""
import sys

from engine.cli import run_finetune_recipe
from engine.config import IWMConfig



def config() -> IWMConfig:
    cfg = IWMConfig(name="finetune_predictor_random")
    cfg.finetune.checkpoint = "runs/pretrain_vitb16_equi"
    cfg.finetune.protocol = "predictor"
    cfg.finetune.predictor_init = "random"  # predictor_lr_scale does not apply: the predictor gets optim.lr
    cfg.data.dataset = "data/imagenet/train"
    cfg.data.batch_size = 128
    cfg.optim.epochs, cfg.optim.warmup_epochs = 100, 5
    cfg.optim.start_lr, cfg.optim.lr, cfg.optim.final_lr = 1e-6, 1e-3, 1e-6
    cfg.optim.weight_decay = cfg.optim.final_weight_decay = 0.05
    cfg.train.out_dir = "runs/finetune_predictor_random"
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 2500, 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_finetune_recipe(config, __doc__))
