"""Weights that leave the engine: a run's model.safetensors loads wherever checkpoint.pt does, and
``python -m engine.export`` writes a folder that timm loads by itself, with the encoder's features."""
import importlib.util
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

from engine import checkpoint as ckpt_lib
from engine.checkpoint import CheckpointError, load_weights, save_weights
from engine.cli import eval_main, export_main
from engine.config import IWMConfig
from engine.export import export
from engine.masks import MaskSampler
from engine.models import IWM, Encoder
from tests.helpers import ROOT, TINY

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, written out (not read from timm)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def recipe_config(name: str) -> IWMConfig:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.config().validate()


def tiny_cfg() -> IWMConfig:
    cfg = IWMConfig(name="export")
    for a in TINY:
        cfg.override(a)
    return cfg.validate()


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights away from their init (LayerNorm gains and biases too), positions left as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def write_run(folder, cfg: IWMConfig, seed: int = 0, metrics=None):
    """A run folder's checkpoint.pt + model.safetensors with distinct encoder / target / predictor weights."""
    torch.manual_seed(seed)
    model, target = IWM(cfg), Encoder(cfg)
    perturbed(model, seed + 1), perturbed(target, seed + 2)
    save_weights(os.path.join(folder, "checkpoint.pt"), config=cfg.to_dict(), step=7, encoder=model.encoder,
                 predictor=model.predictor, target_encoder=target, metrics=metrics)
    return model.eval(), target.eval()


def timm_features(model, images):
    """timm's way: normalise in the data pipeline, then forward_features -> [B, N, D]."""
    return model.forward_features((images - MEAN) / STD)


# ---- a run's model.safetensors is a checkpoint -----------------------------------------------------------
def test_model_safetensors_loads_the_same_payload_as_checkpoint_pt(tmp_path):
    write_run(tmp_path, tiny_cfg(), metrics={"mrr": 0.25})
    pt, st = load_weights(str(tmp_path / "checkpoint.pt")), load_weights(str(tmp_path / "model.safetensors"))
    assert st["config"] == json.loads(json.dumps(pt["config"])) and st["step"] == pt["step"] == 7
    assert st["metrics"] == {"mrr": 0.25} and st["format"] == ckpt_lib.FORMAT
    for part in ("encoder", "predictor", "target_encoder"):
        assert sorted(st[part]) == sorted(pt[part])
        assert all(torch.equal(st[part][k], pt[part][k]) for k in pt[part])
    os.remove(tmp_path / "checkpoint.pt")  # a folder holding only model.safetensors is a run too
    assert torch.equal(load_weights(str(tmp_path))["encoder"]["vit.norm.weight"], pt["encoder"]["vit.norm.weight"])


def test_a_finetuning_payload_keeps_its_fields_in_safetensors(tmp_path):
    payload = {"format": ckpt_lib.FORMAT, "kind": "finetune", "protocol": "encoder", "config": {"name": "x"},
               "step": 3, "classes": ["a", "b"], "model": {"w": torch.arange(6.0).view(2, 3)},
               "metrics": {"top1": 50.0}}
    ckpt_lib.write_weights(str(tmp_path / "checkpoint.pt"), payload)
    st = load_weights(str(tmp_path / "model.safetensors"))
    assert {k: v for k, v in st.items() if k != "model"} == {k: v for k, v in payload.items() if k != "model"}
    assert torch.equal(st["model"]["w"], payload["model"]["w"])


def test_eval_mrr_takes_a_runs_model_safetensors(tmp_path):
    write_run(tmp_path, tiny_cfg())
    results = []
    for name in ("checkpoint.pt", "model.safetensors"):
        out = tmp_path / f"mrr_{name}.json"
        assert eval_main(["mrr", "--ckpt", str(tmp_path / name), "--images", "4", "--candidates", "8",
                          "--out", str(out), "--device", "cpu"]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["mrr"] == results[1]["mrr"] and results[1]["step"] == 7


# ---- the timm round trip --------------------------------------------------------------------------------
def round_trip(tmp_path, cfg, part="target_encoder", batch=4):
    (tmp_path / "run").mkdir()
    model, target = write_run(tmp_path / "run", cfg)
    out = tmp_path / "timm"
    assert export_main([str(tmp_path / "run" / "model.safetensors"), str(out), "--part", part]) == 0
    config = json.loads((out / "config.json").read_text())
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours = target if part == "target_encoder" else model.encoder
    images = torch.rand(batch, 3, cfg.data.img_size, cfg.data.img_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = ours(images), timm_features(loaded, images)
        pooled = loaded((images - MEAN) / STD)
    return config, loaded, expected, got, pooled, out


def test_demo_network_round_trips_through_timm(tmp_path):
    cfg = recipe_config("pretrain_tiny")
    config, loaded, expected, got, pooled, out = round_trip(tmp_path, cfg)
    assert isinstance(loaded, timm.models.VisionTransformer)
    assert config["model_args"]["embed_dim"] == 128 and config["model_args"]["patch_size"] == 8
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and "tag" not in config["pretrained_cfg"]
    # timm's own key names: exactly the state dict of a fresh timm model of that shape
    fresh = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(fresh.state_dict())
    assert got.shape == expected.shape == (4, 64, 128)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, expected.mean(1), rtol=0, atol=1e-5)  # model(x): average-pooled tokens


def test_the_online_encoder_exports_its_own_weights(tmp_path):
    _, _, expected, got, _, _ = round_trip(tmp_path, tiny_cfg(), part="encoder")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vit_b16_shaped_network_round_trips_through_timm(tmp_path):
    cfg = IWMConfig(name="vitb").validate()  # the defaults: ViT-B/16 at 224 px
    target = perturbed(Encoder(cfg), 0).eval()
    # a run's weights file holding the target encoder only (the part exported; 86M parameters once, not thrice)
    ckpt_lib.write_weights(str(tmp_path / "run" / "checkpoint.pt"),
                           {"format": ckpt_lib.FORMAT, "config": cfg.to_dict(), "step": 1,
                            "target_encoder": {k: v.detach() for k, v in target.state_dict().items()}})
    assert export_main([str(tmp_path / "run" / "model.safetensors"), str(tmp_path / "timm")]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = target(images), timm_features(loaded, images)
    assert config["architecture"] == "vit_base_patch16_224"
    d, n = 768, 196  # ViT-B/16 at 224 px without class token or head, counted by hand
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert sum(p.numel() for p in loaded.parameters()) == (3 * 16 * 16 * d + d) + n * d + 12 * block + 2 * d
    assert got.shape == (1, 196, 768)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_predictor_exports_as_a_registered_timm_architecture(tmp_path):
    cfg = tiny_cfg()
    (tmp_path / "run").mkdir()
    model, target = write_run(tmp_path / "run", cfg)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "pred"), "--part", "predictor"]) == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'pred'}", pretrained=True).eval()
    masks = MaskSampler(cfg.masks, *model.encoder.grid).sample(3, torch.Generator().manual_seed(0))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    action = torch.randn(3, cfg.views.action_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        context = model.encoder(images, masks)
        torch.testing.assert_close(loaded(context, masks, action), model.predictor(context, masks, action),
                                   rtol=0, atol=1e-6)


# ---- bad input, and nothing half-written ----------------------------------------------------------------
def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run", tiny_cfg())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert export_main([str(tmp_path / "run"), str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert "not an empty folder" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert export_main([str(tmp_path / "run"), str(tmp_path / "t")]) == 0
    # an exported folder is timm's, not a checkpoint: eval says so
    with pytest.raises(CheckpointError, match="exported for timm"):
        load_weights(str(tmp_path / "t" / "model.safetensors"))
    payload = {"format": ckpt_lib.FORMAT, "kind": "finetune", "config": tiny_cfg().to_dict(), "step": 1,
               "model": {"w": torch.zeros(1)}}
    ckpt_lib.write_weights(str(tmp_path / "ft" / "checkpoint.pt"), payload)
    assert export_main([str(tmp_path / "ft"), str(tmp_path / "o2")]) == 2
    assert "finetune checkpoint" in capsys.readouterr().err


def test_a_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run", tiny_cfg())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("timm.models.save_for_hf", full_disk)
    with pytest.raises(OSError):
        export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["run"]  # neither OUT nor a temporary beside it
