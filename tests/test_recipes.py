"""Every recipe builds a valid config; the large ones have the sizes the paper names."""
import importlib.util
import os

import pytest

from engine.models import IWM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.config().validate()


@pytest.mark.parametrize("name", ["pretrain_tiny", "pretrain_vitb_inv", "pretrain_vitb_equi", "pretrain_vitl_equi",
                                  "pretrain_vith", "finetune_encoder", "finetune_predictor",
                                  "finetune_predictor_random", "finetune_e2e"])
def test_recipe_configs_validate(name):
    load(name)


def test_vith_recipe_shapes():
    cfg = load("pretrain_vith")
    assert cfg.model.encoder_dims() == (1280, 32, 16) and cfg.model.patch_size == 14
    assert cfg.data.img_size // cfg.model.patch_size == 16
    assert cfg.data.batch_size == 128


def test_vitb_equi_predictor_ratio_near_paper():
    # docs/method.md: predictor / encoder parameter ratio about 0.3 for IWM Equi_{18,384} with ViT-B/16
    import torch

    cfg = load("pretrain_vitb_equi")
    with torch.device("meta"):
        model = IWM(cfg)
    enc = sum(p.numel() for p in model.encoder.parameters())
    pred = sum(p.numel() for p in model.predictor.parameters())
    assert 85e6 < enc < 88e6  # ViT-B/16: 86M
    assert 0.25 < pred / enc < 0.45


def test_pretrain_recipes_name_the_papers_predictors():
    assert load("pretrain_vitb_inv").model.predictor_depth == 12
    assert load("pretrain_vitb_inv").model.predictor_width == 384
    vitl = load("pretrain_vitl_equi")
    assert vitl.model.encoder_dims() == (1024, 24, 16) and vitl.model.patch_size == 16
    assert (vitl.model.predictor_depth, vitl.model.predictor_width) == (36, 512)


def test_finetune_recipes_name_their_protocols():
    assert load("finetune_encoder").finetune.protocol == "encoder"
    p = load("finetune_predictor").finetune
    assert p.protocol == "predictor" and p.predictor_init == "pretrained" and p.predictor_lr_scale == 0.1
    assert load("finetune_predictor_random").finetune.predictor_init == "random"
    assert load("finetune_e2e").finetune.protocol == "end_to_end"
