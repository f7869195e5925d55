"""Every recipe's --smoke on 2 CPU ranks under the real `deepspeed` launcher (gloo), all in one launch
(tests/recipes_ranks.py runs each recipe file as ``__main__`` in turn): the pretraining recipes first, then the
finetuning recipes from the tiny recipe's smoke checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.distributed import free_port
from tests.helpers import ROOT, deepspeed_launcher, shm_buffers, subprocess_env

PRETRAIN = ["pretrain_tiny", "pretrain_vitb_inv", "pretrain_vitb_equi", "pretrain_vitl_equi", "pretrain_vith"]
FINETUNE = ["finetune_encoder", "finetune_predictor", "finetune_predictor_random", "finetune_e2e"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(the runs' folder, {recipe: exit code}, the launch's port); each recipe's rank-0 output in RECIPE.stdout."""
    root = tmp_path_factory.mktemp("smoke")
    port = free_port()
    source = root / "pretrain_tiny"
    specs = PRETRAIN + [f"{r}:--ckpt,{source}" for r in FINETUNE]
    cmd = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(port), "tests/recipes_ranks.py", str(root),
           *specs]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, json.loads((root / "codes.json").read_text()), port


def succeeded(smoke, recipe):
    root, codes, _ = smoke
    text = (root / f"{recipe}.stdout").read_text()
    assert codes[recipe] == 0, text[-3000:]
    return root / recipe, text


@pytest.mark.slow
def test_pretrain_tiny_smoke(smoke):
    out, _ = succeeded(smoke, "pretrain_tiny")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["data"]["img_size"] == 32
    assert shm_buffers(smoke[2]) == []  # each rank removed its own at exit


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PRETRAIN[1:])
def test_pretrain_recipe_smoke(smoke, recipe):
    from engine.config import load_recipe

    out, _ = succeeded(smoke, recipe)
    saved = json.loads((out / "config.json").read_text())
    full = load_recipe(os.path.join(ROOT, "recipes", f"{recipe}.py"))
    # the smoke run keeps the recipe's code paths: ZeRO stage, conditioning, masks, views
    assert saved["train"]["zero_stage"] == full.train.zero_stage
    assert saved["model"]["conditioning"] == full.model.conditioning
    assert saved["masks"] == json.loads(json.dumps(full.to_dict()["masks"]))
    assert saved["views"] == json.loads(json.dumps(full.to_dict()["views"]))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("recipe", FINETUNE)
def test_finetune_recipe_smoke(smoke, recipe):
    out, text = succeeded(smoke, recipe)
    assert "top1" in text
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "finetune" and ckpt["step"] == 4
    assert os.path.isfile(out / "best.pt")
    result = json.loads((out / "finetune.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["source"] == os.path.abspath(smoke[0] / "pretrain_tiny")
    # both ranks wrote their optimizer partition (DeepSpeed ZeRO, like pretraining)
    tag = out / "ds" / "step_00000004"
    assert sum("optim_states" in f for f in os.listdir(tag)) == 2
