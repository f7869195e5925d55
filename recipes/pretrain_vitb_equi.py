"""IWM^{Equi}_{18,384} with a ViT-B/16 encoder on ImageNet-1k: the paper's main equivariant model.

    deepspeed --num_gpus 8 recipes/pretrain_vitb_equi.py --data /datasets/imagenet/train

300 epochs, batch 128 per GPU; feature conditioning; the predictor is kept for finetuning.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_recipe  # noqa: E402
from engine.config import IWMConfig  # noqa: E402


def config() -> IWMConfig:
    cfg = IWMConfig(name="pretrain_vitb16_equi")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.data.img_size = 224
    cfg.data.batch_size = 128
    cfg.data.num_workers = 10
    cfg.model.encoder, cfg.model.patch_size = "vit_base", 16
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 18, 384, 12
    cfg.model.conditioning = "feature"
    cfg.optim.epochs, cfg.optim.warmup_epochs = 300, 40
    cfg.train.out_dir = "runs/pretrain_vitb16_equi"
    cfg.train.log_every = 50
    cfg.train.eval_every = 5000
    cfg.train.ckpt_every = 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
