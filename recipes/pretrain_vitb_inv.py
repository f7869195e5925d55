"""IWM^{Inv}_{12,384} with a ViT-B/16 encoder on ImageNet-1k: the paper's invariant model (best probes).

    deepspeed --num_gpus 8 recipes/pretrain_vitb_inv.py --data /datasets/imagenet/train
    python recipes/pretrain_vitb_inv.py --smoke            # the same code paths, seconds on CPU

A shallower predictor (12 x 384) than the equivariant model, with the default (mild) colour jitter and the
destructive augmentations: it learns a world model with a low MRR and an encoder that probes well.
300 epochs at the published global batch 2048 (128 per GPU; on 8 GPUs two micro-batches accumulated per step);
feature conditioning.
"""
import sys

from engine.cli import run_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    cfg = IWMConfig(name="pretrain_vitb16_inv")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 12, 384, 12
    cfg.optim.global_batch = 2048  # the published batch, whatever the GPU count (it must divide 128 x GPUs)
    cfg.train.out_dir = "runs/pretrain_vitb16_inv"
    return cfg


if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
