"""IWM^{Equi}_{36,512} with a ViT-L/16 encoder on ImageNet-1k: the paper's scaled equivariant model.

    deepspeed --num_gpus 8 recipes/pretrain_vitl_equi.py --data /datasets/imagenet/train
    python recipes/pretrain_vitl_equi.py --smoke           # the same code paths, seconds on CPU

Predictor 36 x 512 (16 heads), feature conditioning, 300 epochs at the published global batch 2048 (128 per GPU;
on 8 GPUs two micro-batches accumulated per step), bf16 on CUDA.
"""
import sys

from engine.cli import run_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    cfg = IWMConfig(name="pretrain_vitl16_equi")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.data.num_workers = 10
    cfg.model.encoder, cfg.model.patch_size = "vit_large", 16
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 36, 512, 16
    cfg.optim.global_batch = 2048  # the published batch, whatever the GPU count (it must divide 128 x GPUs)
    cfg.train.out_dir = "runs/pretrain_vitl16_equi"
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 5000, 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
