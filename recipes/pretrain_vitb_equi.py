"""IWM^{Equi}_{18,384} with a ViT-B/16 encoder on ImageNet-1k: the paper's main equivariant model.

    deepspeed --num_gpus 8 recipes/pretrain_vitb_equi.py --data /datasets/imagenet/train

300 epochs at the published global batch 2048: 128 per GPU, on 8 GPUs two micro-batches accumulated per step
(optim.global_batch); feature conditioning; the predictor is kept for finetuning.
"""
import sys

from engine.cli import run_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    # the config defaults are this run: ViT-B/16, IWM^{Equi}_{18,384} feature-conditioned predictor,
    # 224 px, batch 128 per GPU, 300 epochs of the I-JEPA schedule (engine/config.py)
    cfg = IWMConfig(name="pretrain_vitb16_equi")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.optim.global_batch = 2048  # the published batch, whatever the GPU count (it must divide 128 x GPUs)
    cfg.train.out_dir = "runs/pretrain_vitb16_equi"
    return cfg

if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
