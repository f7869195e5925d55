"""IWM with a ViT-H/14 encoder on ImageNet-1k, on GPU nodes (I-JEPA ViT-H/14 optimisation, docs/method.md).

    deepspeed --num_gpus 8 recipes/pretrain_vith.py --data /datasets/imagenet/train        # one node
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 recipes/pretrain_vith.py --data ...  # 16 GPUs

Global batch 2048 whatever the GPU count (128 per GPU; on 8 GPUs two micro-batches are accumulated per
step), bf16 autocast, 300 epochs. Predictor 12 x 384: the only published predictor for a ViT-H/14 JEPA
(I-JEPA's). The IWM paper publishes Inv_{12,384} / Equi_{18,384} for ViT-B and Equi_{36,512} for ViT-L
(recipes/pretrain_vitl_equi.py); an equivariant ViT-H predictor is unpublished: try
--set model.predictor_depth=36 --set model.predictor_width=512 --set model.predictor_heads=16.
Plan memory and time first: python -m engine.plan recipes/pretrain_vith.py --gpus 16 --gpu-mem 80
"""
import sys

from engine.cli import run_recipe
from engine.config import IWMConfig


def config() -> IWMConfig:
    cfg = IWMConfig(name="pretrain_vith14")
    cfg.data.dataset = "data/imagenet/train"  # pass --data to point at your copy
    cfg.data.num_workers = 10
    cfg.model.encoder, cfg.model.patch_size = "vit_huge", 14
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 12, 384, 12
    cfg.optim.global_batch = 2048
    cfg.train.out_dir = "runs/pretrain_vith14"
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 5000, 2500
    return cfg


if __name__ == "__main__":
    sys.exit(run_recipe(config, __doc__))
