"""The world model as a tool (engine/world_model.py): retrieval against a brute-force loop and an oracle,
imagine / encode_target against a hand computation through the networks, named actions against the
jitter formulas written out here (and the direction of the training relation), the imagine command."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import engine.world_model as W
from engine.config import ViewConfig
from engine.masks import MaskBatch
from engine.models import IWM, Encoder
from engine.views import apply_jitter, identity_action
from engine.world_model import WorldModel, named_action, named_actions, rank_latents
from tests.helpers import tiny_cfg
from tests.helpers import ROOT, subprocess_env

LUMA = (0.2989, 0.587, 0.114)


@pytest.fixture(scope="module")
def wm():
    cfg = tiny_cfg("feature")
    torch.manual_seed(0)
    model = IWM(cfg).eval()
    target = Encoder(cfg).eval()  # its own weights: encode_target must not use the online encoder
    return WorldModel(cfg, model.encoder, model.predictor, target)


def images(n, size=32, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_layer_norm(v, eps):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps)


# ----------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------
def test_retrieve_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    K, N, D = 9, 5, 7
    cands, queries = torch.randn(K, N, D, generator=g), torch.randn(3, N, D, generator=g)
    batched = rank_latents(queries, cands)
    for b in range(3):
        q = queries[b].flatten().tolist()
        dist = [math.fsum((c - p) ** 2 for c, p in zip(cands[k].flatten().tolist(), q)) for k in range(K)]
        order = sorted(range(K), key=lambda k: dist[k])
        one = rank_latents(queries[b], cands)
        for r in (one, W.Ranking(batched.order[b], batched.distance[b])):
            assert r.order.tolist() == order
            assert r.distance.dtype == torch.float64
            assert r.distance.tolist() == pytest.approx(dist, rel=1e-12)
        assert one.rank_of(order[0]) == 1 and one.rank_of(order[-1]) == K


def test_ties_take_the_mid_rank():
    r = W.Ranking(torch.tensor([1, 0, 2, 3]), torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    assert [r.rank_of(k) for k in range(4)] == [2.5, 1.0, 2.5, 4.0]


def test_an_oracle_latent_ranks_its_candidate_first(wm):
    cands = images(6)
    latents = wm.encode_target(cands)
    for k in range(6):
        by_latent = wm.retrieve(latents[k], latents)
        by_image = wm.retrieve(latents[k], cands)
        assert by_latent.order[0] == k and by_latent.distance[k] == 0 and by_latent.rank_of(k) == 1
        assert by_image.order.tolist() == by_latent.order.tolist()
    with pytest.raises(ValueError, match="same \\[N, D\\]"):
        wm.retrieve(latents[0][:3], latents)


# ----------------------------------------------------------------------------------------------------
# imagine / encode_target against the networks by hand
# ----------------------------------------------------------------------------------------------------
def test_imagine_is_the_predictor_on_every_patch_layer_normed(wm):
    x = images(3)
    B, N, eps = 3, wm.encoder.num_patches, wm.cfg.model.target_norm_eps
    actions = identity_action(B, wm.cfg.views)
    actions[:, 0] = torch.tensor([0.8, 1.0, 1.3])
    with torch.no_grad():
        tokens = wm.encoder(x)  # [B, N, D]: the whole-image forward, not the masked one imagine uses
        idx = torch.arange(N).repeat(B)
        every = MaskBatch(grid=wm.encoder.grid, context_idx=idx, target_idx=idx, context_counts=[N] * B,
                          target_counts=[N] * B)
        raw = wm.predictor(tokens.reshape(B * N, -1), every, actions).view(B, N, -1)
    expected = hand_layer_norm(raw, eps)
    got = wm.imagine(x, actions)
    assert got.shape == (B, N, wm.encoder.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.mean(-1).abs().max() < 1e-5 and (got.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    torch.testing.assert_close(wm.imagine(x[1], actions[1]), expected[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], wm.imagine(x[0], actions[1]))  # the action changes the prediction


def test_encode_target_is_the_target_encoder_layer_normed(wm):
    x = images(2)
    with torch.no_grad():
        expected = hand_layer_norm(wm.target_encoder(x), wm.cfg.model.target_norm_eps)
        online = hand_layer_norm(wm.encoder(x), wm.cfg.model.target_norm_eps)
    got = wm.encode_target(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, online, atol=1e-2)


def test_wrong_shapes_are_refused_with_the_expected_shape(wm):
    with pytest.raises(ValueError, match="img_size"):
        wm.imagine(images(1, size=48), identity_action(1, wm.cfg.views))
    with pytest.raises(ValueError, match="action must be \\[2, 12\\]"):
        wm.imagine(images(2), identity_action(2, wm.cfg.views)[:, :8])


# ----------------------------------------------------------------------------------------------------
# Named actions: the true target written out from the op formulas; the training direction
# ----------------------------------------------------------------------------------------------------
def gray(x):  # [3, H, W] -> [1, H, W]
    return (LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2])[None]


REFERENCES = {  # name -> (action column, J_x^{-1} above 1 (or hue > 0)?, the op on x with that value)
    "brighter": ("brightness", True, lambda x, f: (f * x).clamp(0, 1)),
    "darker": ("brightness", False, lambda x, f: (f * x).clamp(0, 1)),
    "more contrast": ("contrast", True, lambda x, f: (f * x + (1 - f) * gray(x).mean()).clamp(0, 1)),
    "less contrast": ("contrast", False, lambda x, f: (f * x + (1 - f) * gray(x).mean()).clamp(0, 1)),
    "more saturated": ("saturation", True, lambda x, f: (f * x + (1 - f) * gray(x)).clamp(0, 1)),
    "less saturated": ("saturation", False, lambda x, f: (f * x + (1 - f) * gray(x)).clamp(0, 1)),
    "hue +": ("hue", True, lambda x, h: TF.adjust_hue(x, h)),
    "hue -": ("hue", False, lambda x, h: TF.adjust_hue(x, h)),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_a_jitter_action_maps_the_image_to_its_true_target(name):
    cfg = ViewConfig()
    image = images(1)[0]
    column, up, op = REFERENCES[name]
    ex = named_action(image, name, cfg)
    cols = list(cfg.action_columns)
    value = ex.action[cols.index(column)].item()
    # the action's value is J_x^{-1}'s: 1 / J_x's factor (or -J_x's hue), the change from x to y
    rng = getattr(cfg, column)
    if column == "hue":
        assert value == pytest.approx((1 if up else -1) * 0.85 * rng)
        assert getattr(ex.params, column).item() == pytest.approx(-value)
    else:
        assert value == pytest.approx(1 / (1 - 0.85 * rng) if up else 1 / (1 + 0.85 * rng))
        assert getattr(ex.params, column).item() == pytest.approx(1 / value)
    assert (value > (0 if column == "hue" else 1)) == up
    # every other column is the identity action's (canonical order, no destructive op)
    other = [i for i, c in enumerate(cols) if c != column]
    assert ex.action[other].tolist() == identity_action(1, cfg)[0, other].tolist()
    assert torch.equal(ex.source, image)
    torch.testing.assert_close(ex.target, op(image, value), atol=1e-4, rtol=0)
    if name == "brighter":
        assert ex.target.mean() > image.mean()
    # the training relation: the source's own jitter J_x takes y back to x (where y did not clamp)
    back = apply_jitter(ex.target[None], ex.params)[0]
    inside = ((ex.target > 1e-4) & (ex.target < 1 - 1e-4)).all(0)
    if column != "contrast":  # per-pixel ops: compare the pixels that did not clamp
        torch.testing.assert_close(back[:, inside], image[:, inside], atol=1e-4, rtol=0)


def test_grayscale_source_with_the_colour_image_as_target():
    cfg = ViewConfig()
    image = images(1)[0]
    ex = named_action(image, "grayscale", cfg)
    torch.testing.assert_close(ex.source, gray(image).expand(3, -1, -1), atol=1e-6, rtol=0)
    assert torch.equal(ex.target, image)
    expected = identity_action(1, cfg)[0]
    expected[list(cfg.action_columns).index("grayscale")] = 1.0
    assert ex.action.tolist() == expected.tolist()


def test_named_actions_follow_the_config():
    fixed = ViewConfig(jitter_order="fixed", brightness=0.0)
    exs = named_actions(images(1)[0], fixed)
    assert [e.name for e in exs] == ["more saturated", "less saturated", "hue +", "hue -", "grayscale"]
    assert all(e.action.shape == (8,) for e in exs)
    with pytest.raises(ValueError, match="unknown action 'sharper'"):
        named_actions(images(1)[0], fixed, names=["sharper"])


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, wm):
    from engine import checkpoint as ckpt_lib

    root = tmp_path_factory.mktemp("imagine")
    ckpt_lib.save_weights(str(root / "checkpoint.pt"), config=wm.cfg.to_dict(), step=7, encoder=wm.encoder,
                          predictor=wm.predictor, target_encoder=wm.target_encoder)
    pixels = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    Image.fromarray(pixels).save(root / "photo.png")  # not square, not 32 px: resized and centre-cropped
    return root


def test_imagine_cli_writes_a_png_and_json(run_dir):
    env = subprocess_env()
    p = subprocess.run([sys.executable, "-m", "engine.eval", "imagine", "--ckpt", str(run_dir), "--image",
                        str(run_dir / "photo.png"), "--candidates", "6", "--top", "3", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    with Image.open(run_dir / "imagine.png") as im:
        assert im.format == "PNG" and im.width > 300
    res = json.loads((run_dir / "imagine.json").read_text())
    assert list(res["actions"]) == list(W.DEMO_ACTIONS)
    C = len(W.DEMO_ACTIONS) + 6
    assert res["candidates"] == C and res["step"] == 7
    assert res["chance_mrr"] == pytest.approx(sum(1 / r for r in range(1, C + 1)) / C)
    assert all(1 <= a["rank"] <= C for a in res["actions"].values())
    assert res["actions"]["brighter"]["action"]["brightness"] > 1
    assert "ranked" in p.stdout


def test_an_oracle_world_model_ranks_every_true_target_first(run_dir, monkeypatch, tmp_path):
    """imagine replaced by the target latents of the true targets (recorded from named_actions): every
    action's true target must come out rank 1, so the command pairs each row with its own target."""
    from engine.cli import eval_main

    record = {}
    real = W.named_actions

    def spy(*a, **k):
        record["examples"] = real(*a, **k)
        return record["examples"]

    monkeypatch.setattr(W, "named_actions", spy)
    monkeypatch.setattr(WorldModel, "imagine",
                        lambda self, x, a: self.encode_target(torch.stack([e.target for e in record["examples"]])))
    out = tmp_path / "o.png"
    assert eval_main(["imagine", "--ckpt", str(run_dir), "--image", str(run_dir / "photo.png"), "--candidates", "5",
                      "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert [a["rank"] for a in res["actions"].values()] == [1.0] * len(W.DEMO_ACTIONS) and res["mrr"] == 1.0


def test_imagine_bad_image_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    from engine.cli import eval_main

    (tmp_path / "notes.png").write_text("not an image")
    for image, needle in ((tmp_path / "missing.png", "does not exist"), (tmp_path / "notes.png", "cannot read")):
        assert eval_main(["imagine", "--ckpt", str(run_dir), "--image", str(image), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and str(image) in err, err
    with pytest.raises(SystemExit) as e:  # the JSON would overwrite the picture
        eval_main(["imagine", "--ckpt", str(run_dir), "--image", str(image), "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "give a .png path" in capsys.readouterr().err


def test_imagine_takes_an_embedded_val_image(run_dir, tmp_path, capsys, monkeypatch):
    """--image embedded:N is the N-th embedded val image, centre view (the README's command needs no file)."""
    from engine.cli import eval_main
    from engine.data import to_float_images
    from engine.eval import eval_dataset

    seen = {}
    real = W.imagine_demo

    def spy(wm, image, **kw):
        seen["image"] = image
        return real(wm, image, **kw)

    monkeypatch.setattr(W, "imagine_demo", spy)
    out = tmp_path / "e.png"
    assert eval_main(["imagine", "--ckpt", str(run_dir), "--image", "embedded:3", "--candidates", "4",
                      "--out", str(out), "--device", "cpu"]) == 0
    cfg = WorldModel.load(str(run_dir)).cfg
    expected = to_float_images(eval_dataset(cfg, "val", "embedded")[3][0][None], "cpu")[0]
    assert torch.equal(seen["image"], expected) and out.exists()
    for bad in ("embedded:x", "embedded:100000"):
        assert eval_main(["imagine", "--ckpt", str(run_dir), "--image", bad, "--device", "cpu"]) == 2
        assert "use embedded:N" in capsys.readouterr().err
