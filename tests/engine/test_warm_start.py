"""Warm starts (``--init PATH``, engine/warm_start.py): our checkpoint.pt and model.safetensors, the official I-JEPA
layout, the part-by-part report, one-line errors, the refusal to start into another run.

The I-JEPA file is built from independent sources: the encoder is a timm VisionTransformer (I-JEPA's encoder has
timm's parameter names), the predictor's names are I-JEPA's (src/models/vision_transformer.py,
VisionTransformerPredictor), and the fixed position tables are MAE's get_2d_sincos_pos_embed, written out below.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.layers import Mlp  # noqa: F401 (timm's block below builds one)
from timm.models.vision_transformer import Block, VisionTransformer

from engine.checkpoint import CheckpointError, save_weights
from engine.warm_start import read_weights
from tests.helpers import ROOT, subprocess_env, tiny_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def mae_sincos(dim, grid):
    """MAE's / I-JEPA's get_2d_sincos_pos_embed (no class token), as published: [grid*grid, dim]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # (w, h) first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return torch.tensor(np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)).float()


def ijepa_encoder(seed, dim=48, depth=2, heads=4, img=32, patch=8):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                            class_token=False, global_pool="", num_classes=0)
    with torch.no_grad():
        vit.pos_embed.copy_(mae_sincos(dim, img // patch)[None])
        for p in vit.parameters():  # non-trivial norms and biases, so a misplaced tensor shows
            p.add_(0.05 * torch.randn_like(p))
        vit.pos_embed.copy_(mae_sincos(dim, img // patch)[None])
    return vit.eval()


def ijepa_predictor_state(seed, dim=48, width=32, depth=2, heads=4, patches=16):
    """I-JEPA's VisionTransformerPredictor state dict for these sizes (its names; blocks are timm-named)."""
    torch.manual_seed(seed)
    sd = {"predictor_embed.weight": torch.randn(width, dim), "predictor_embed.bias": torch.randn(width),
          "mask_token": torch.randn(1, 1, width), "predictor_pos_embed": mae_sincos(width, 4)[None],
          "predictor_norm.weight": torch.randn(width), "predictor_norm.bias": torch.randn(width),
          "predictor_proj.weight": torch.randn(dim, width), "predictor_proj.bias": torch.randn(dim)}
    for i in range(depth):
        for k, v in Block(width, heads, qkv_bias=True).state_dict().items():
            sd[f"predictor_blocks.{i}.{k}"] = torch.randn_like(v)
    return sd


def write_ijepa(path, **sizes):
    enc, tgt = ijepa_encoder(1), ijepa_encoder(2)
    module = lambda sd: {f"module.{k}": v for k, v in sd.items()}  # noqa: E731 (DDP's prefix)
    torch.save({"encoder": module(enc.state_dict()), "predictor": module(ijepa_predictor_state(3)),
                "target_encoder": module(tgt.state_dict()), "epoch": 300, "loss": 0.1, "batch_size": 128,
                "world_size": 16, "lr": 1e-3, "opt": {"state": {}, "param_groups": []}, "scaler": None}, path)
    return enc, tgt


def task_of(cfg):
    from engine.pretrain import Pretraining

    return Pretraining(cfg, torch.device("cpu"))


COLUMNS_FIRST = ["model.pos_layout='columns_first'"]


def test_ijepa_checkpoint_maps_onto_our_networks(tmp_path):
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    enc, tgt = write_ijepa(path)
    task = task_of(tiny_config(tmp_path / "run", 1, COLUMNS_FIRST))
    report = task.warm_start(read_weights(str(path)))
    images = torch.rand(3, 3, 32, 32)
    normalised = (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():  # our encoder computes what the timm ViT holding I-JEPA's weights computes
        torch.testing.assert_close(task.model.encoder.eval()(images), enc(normalised), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(task.target_encoder(images), tgt(normalised), rtol=1e-5, atol=1e-5)
    pred, theirs = task.model.predictor.state_dict(), ijepa_predictor_state(3)
    assert torch.equal(pred["embed.weight"], theirs["predictor_embed.weight"])
    assert torch.equal(pred["blocks.1.mlp.fc2.weight"], theirs["predictor_blocks.1.mlp.fc2.weight"])
    assert torch.equal(pred["mask_token"], theirs["mask_token"].reshape(-1))
    assert torch.equal(pred["proj.bias"], theirs["predictor_proj.bias"])
    text = "\n".join(report)
    assert "(i-jepa, pretrain step 300)" in report[0]
    assert "encoder: loaded 29 of 29 tensors" in text and "target_encoder: loaded 29 of 29" in text
    # IWM's feature conditioning has no I-JEPA counterpart: reported as left at its initialisation
    assert "predictor: loaded 31 of 37 tensors; left at initialisation: cond.fc1.weight" in text


def test_ijepa_tables_need_their_layout(tmp_path):
    path = tmp_path / "ijepa.pth.tar"
    write_ijepa(path)
    with pytest.raises(CheckpointError, match=r"encoder\.vit\.pos_embed.*model\.pos_layout=columns_first"):
        task_of(tiny_config(tmp_path / "run", 1)).warm_start(read_weights(str(path)))


def test_shape_mismatch_names_the_first_tensor(tmp_path):
    path = tmp_path / "ijepa.pth.tar"
    write_ijepa(path)
    cfg = tiny_config(tmp_path / "run", 1, COLUMNS_FIRST + ["model.patch_size=4"])
    with pytest.raises(CheckpointError) as e:
        task_of(cfg).warm_start(read_weights(str(path)))
    # the file's first tensor that does not fit (timm's order: the position table comes first)
    assert "encoder.vit.pos_embed has shape (1, 16, 48) in the file, (1, 64, 48) in this model" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.safetensors", ""])
def test_our_files_load_exactly(tmp_path, name):
    source = task_of(tiny_config(tmp_path / "a", 1, ["train.seed=7"]))
    with torch.no_grad():
        for key, p in source.target_encoder.module.named_parameters():
            if key != "vit.pos_embed":  # (the fixed table must stay the model's)
                p.mul_(0.5)  # the target differs from the encoder: each part must come from its own entry
    save_weights(str(tmp_path / "checkpoint.pt"), config=source.cfg.to_dict(), step=5, encoder=source.model.encoder,
                 predictor=source.model.predictor, target_encoder=source.target_encoder.module)
    task = task_of(tiny_config(tmp_path / "b", 1))
    report = task.warm_start(read_weights(str(tmp_path / name) if name else str(tmp_path)))
    for ours, theirs in ((task.model.encoder, source.model.encoder), (task.model.predictor, source.model.predictor),
                         (task.target_encoder.module, source.target_encoder.module)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("left at" not in line and "not used" not in line for line in report), report


@pytest.mark.parametrize("content,needle", [
    (b"not a checkpoint", "cannot be read"),
    (None, "does not exist"),
])
def test_bad_files_are_one_line(tmp_path, content, needle):
    path = tmp_path / "weights.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as e:
        read_weights(str(path))
    assert "\n" not in str(e.value)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither an IWM checkpoint"):
        read_weights(str(tmp_path / "other.pt"))


def test_init_refuses_a_folder_holding_another_run(tmp_path):
    from engine.run import check_init_target

    cfg = tiny_config(tmp_path, 1, ["train.init='/w/a.pt'"])
    check_init_target(None, None, cfg, str(tmp_path))  # empty folder
    check_init_target({"train": {"init": "/w/a.pt"}}, "step_00000002", cfg, str(tmp_path))  # its own run: resumes
    for saved in ({"train": {"init": ""}}, {"train": {"init": "/w/b.pt"}}, None):
        with pytest.raises(CheckpointError, match="--fresh"):
            check_init_target(saved, "step_00000002", cfg, str(tmp_path))
    cfg.train.resume = False  # --fresh: the old run is moved aside
    check_init_target({"train": {"init": ""}}, "step_00000002", cfg, str(tmp_path))


@pytest.mark.slow
def test_warm_started_run_starts_at_step_0_from_the_weights_and_resumes_on_rerun(tmp_path):
    """With a zero learning rate and no weight decay one AdamW step changes nothing: the new run's weights are the
    file's, bit for bit, whatever the optimizer state; the same command rerun resumes the run it started."""
    from engine.pretrain import pretrain

    pretrain(tiny_config(tmp_path / "a", 2))
    frozen = ["optim.start_lr=0.0", "optim.lr=0.0", "optim.final_lr=0.0", "optim.weight_decay=0.0",
              "optim.final_weight_decay=0.0", f"train.init='{tmp_path / 'a'}'", "train.seed=5"]
    result = pretrain(tiny_config(tmp_path / "b", 1, frozen))
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("a", "b"))
    assert result.step == 1 and b["step"] == 1 and a["step"] == 2
    for part in ("encoder", "predictor"):
        assert all(torch.equal(b[part][k], a[part][k]) for k in a[part]), part
    again = pretrain(tiny_config(tmp_path / "b", 2, frozen))  # a requeued job: same --init, same folder
    assert again.step == 2
    with pytest.raises(CheckpointError, match="--fresh"):  # another run's folder
        pretrain(tiny_config(tmp_path / "a", 3, frozen[-2:]))


@pytest.mark.slow
def test_finetuning_from_an_ijepa_checkpoint(tmp_path):
    """``--init`` on a finetuning recipe: the network from I-JEPA's file (its target encoder), exit code 0; a
    mismatching file is one line and exit code 2."""
    path = tmp_path / "ijepa.pth.tar"
    write_ijepa(path)
    sets = [a for t in ["model.encoder='custom'", "model.embed_dim=48", "model.depth=2", "model.num_heads=4",
                        "model.patch_size=8", "model.predictor_depth=2", "model.predictor_width=32",
                        "model.predictor_heads=4", "model.pos_layout='columns_first'"] for a in ("--set", t)]
    cmd = lambda out, sets: [sys.executable, "recipes/finetune_encoder.py", "--smoke", "--init", str(path),  # noqa
                             "--out", str(tmp_path / out), *sets]
    p = subprocess.run(cmd("ft", sets), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "encoder (from the file's target_encoder): loaded 29 of 29 tensors" in p.stderr
    assert "head: left at its initialisation" in p.stderr
    bad = subprocess.run(cmd("bad", sets[:-2]), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)  # rows_first positions
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --init ")
