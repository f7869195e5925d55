"""Every recipe builds a valid config; the large ones have the sizes the paper names."""
import ast
import os

import pytest

from engine.config import load_recipe
from engine.models import IWM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_path(name):
    return os.path.join(ROOT, "recipes", f"{name}.py")


def load(name):
    return load_recipe(recipe_path(name)).validate()


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


# the paper's global batch per pretraining recipe (docs/method.md "Optimisation"); the CPU demo states its own
PUBLISHED_GLOBAL_BATCH = {"pretrain_vitb_inv": 2048, "pretrain_vitb_equi": 2048, "pretrain_vitl_equi": 2048,
                          "pretrain_vith": 2048, "pretrain_tiny": 32}


def launch_lines(name):
    """The GPU counts the recipe's docstring launches it on: (line, ranks) for each `deepspeed` / `python` line."""
    with open(recipe_path(name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    out = []
    for line in doc.splitlines():
        words = line.split()
        if not words or words[0] not in ("deepspeed", "python") or f"recipes/{name}.py" not in words or \
                "--smoke" in words or "--set" in words:
            continue
        value = lambda flag, default: int(words[words.index(flag) + 1]) if flag in words else default  # noqa: E731
        out.append((line.strip(), value("--num_gpus", 1) * value("--num_nodes", 1) if words[0] == "deepspeed" else 1))
    return out


def test_every_pretraining_recipe_is_listed_with_its_published_batch():
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "recipes"))
                   if f.startswith("pretrain_") and f.endswith(".py"))
    assert names == sorted(PUBLISHED_GLOBAL_BATCH)


@pytest.mark.parametrize("name", sorted(PUBLISHED_GLOBAL_BATCH))
def test_every_launch_in_a_recipes_docstring_trains_at_its_published_global_batch(name):
    from engine.run import deepspeed_config

    cfg = load(name)
    launches = launch_lines(name) if name != "pretrain_tiny" else [(ln, r) for ln, r in launch_lines(name) if r == 1]
    assert launches, f"{name}: no launch line in its docstring"
    for line, ranks in launches:
        ds = deepspeed_config(cfg, ranks)  # what DeepSpeed is given
        micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        assert micro * ranks * accum == ds["train_batch_size"] == PUBLISHED_GLOBAL_BATCH[name], line
