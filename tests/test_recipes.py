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


@pytest.mark.parametrize("name", ["pretrain_tiny", "pretrain_vitb_equi", "pretrain_vith"])
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
