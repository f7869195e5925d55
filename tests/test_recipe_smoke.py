"""Every recipe's --smoke under the real `deepspeed` launcher (2 CPU ranks, gloo): the pretraining recipes
first, then the finetuning recipes from the smoke pretraining checkpoint; then the eval commands on them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import shm_buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ["pretrain_tiny", "pretrain_vitb_inv", "pretrain_vitb_equi", "pretrain_vitl_equi", "pretrain_vith"]
FINETUNE = ["finetune_encoder", "finetune_predictor", "finetune_predictor_random", "finetune_e2e"]


def launch(recipe, *args, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(port + os.getpid() % 89), f"recipes/{recipe}.py", "--smoke", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke_pretrain(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "pretrain_tiny"
    p = launch("pretrain_tiny", "--out", str(out), port=29700)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.mark.slow
def test_pretrain_tiny_smoke(smoke_pretrain):
    ckpt = torch.load(smoke_pretrain / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["data"]["img_size"] == 32
    assert shm_buffers(29700 + os.getpid() % 89) == []  # each rank removed its own at exit


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PRETRAIN[1:])
def test_pretrain_recipe_smoke(recipe, tmp_path):
    from engine.config import load_recipe

    p = launch(recipe, "--out", str(tmp_path / recipe), port=29720 + 5 * PRETRAIN.index(recipe))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    saved = json.loads((tmp_path / recipe / "config.json").read_text())
    full = load_recipe(os.path.join(ROOT, "recipes", f"{recipe}.py"))
    # the smoke run keeps the recipe's code paths: ZeRO stage, conditioning, masks, views
    assert saved["train"]["zero_stage"] == full.train.zero_stage
    assert saved["model"]["conditioning"] == full.model.conditioning
    assert saved["masks"] == json.loads(json.dumps(full.to_dict()["masks"]))
    assert saved["views"] == json.loads(json.dumps(full.to_dict()["views"]))
    assert torch.load(tmp_path / recipe / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("recipe", FINETUNE)
def test_finetune_recipe_smoke(recipe, smoke_pretrain, tmp_path):
    out = tmp_path / recipe
    p = launch(recipe, "--ckpt", str(smoke_pretrain), "--out", str(out), port=29760 + 5 * FINETUNE.index(recipe))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "top1" in p.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "finetune" and ckpt["step"] == 4
    assert os.path.isfile(out / "best.pt")
    result = json.loads((out / "finetune.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["source"] == os.path.abspath(smoke_pretrain)
    # both ranks wrote their optimizer partition (DeepSpeed ZeRO, like pretraining)
    tag = out / "ds" / "step_00000004"
    assert sum("optim_states" in f for f in os.listdir(tag)) == 2
