"""Networks: packed ragged forward passes against per-sample dense loops; conditioning modes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from engine.config import IWMConfig
from engine.masks import MaskSampler
from engine.models import IWM, Encoder, make_target_encoder, sincos_2d


def tiny_cfg(conditioning="feature", img=32, patch=8):
    cfg = IWMConfig()
    cfg.data.img_size = img
    cfg.model.encoder = "custom"
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = 32, 2, 4
    cfg.model.patch_size = patch
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 2, 16, 2
    cfg.model.conditioning = conditioning
    return cfg.validate()


def sample(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = cfg.data.img_size // cfg.model.patch_size
    masks = MaskSampler(cfg.masks, grid, grid).sample(B, g)
    images = torch.rand(B, 3, cfg.data.img_size, cfg.data.img_size, generator=g)
    action = torch.randn(B, cfg.views.action_dim, generator=g)
    return images, masks, action


def test_sincos_formula():
    pe = sincos_2d(8, 2, 3)  # [6, 8]; row y = 1, col x = 2 is index 5
    y, x = 1.0, 2.0
    omega = [1.0, 1.0 / 10000 ** 0.5]
    expected = [torch.sin(torch.tensor(y * omega[0])), torch.sin(torch.tensor(y * omega[1])),
                torch.cos(torch.tensor(y * omega[0])), torch.cos(torch.tensor(y * omega[1])),
                torch.sin(torch.tensor(x * omega[0])), torch.sin(torch.tensor(x * omega[1])),
                torch.cos(torch.tensor(x * omega[0])), torch.cos(torch.tensor(x * omega[1]))]
    torch.testing.assert_close(pe[5], torch.stack(expected))


def encoder_loop(enc: Encoder, images, masks):
    """Plain per-sample forward: gather one sample's context patches, run timm blocks densely."""
    outs = []
    x_all = enc.vit.patch_embed(images) + enc.vit.pos_embed
    for b in range(images.shape[0]):
        idx = masks.context_idx[masks.context_cu[b]:masks.context_cu[b + 1]]
        x = x_all[b:b + 1, idx]
        for blk in enc.vit.blocks:
            x = blk(x)
        outs.append(enc.vit.norm(x)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_packed_encoder_equals_per_sample_loop(backend):
    from kernels import dispatch

    cfg = tiny_cfg()
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    images, masks, _ = sample(cfg, 5)
    with dispatch.backend(attention=backend):
        packed = enc(images, masks)
    torch.testing.assert_close(packed, encoder_loop(enc, images, masks), atol=1e-5, rtol=1e-4)


def predictor_loop(pred, context, masks, action):
    """Plain per-sample predictor: [ctx tokens, mask tokens (+ action tokens)] densely, no packing."""
    outs = []
    for b in range(masks.batch_size):
        c = context[masks.context_cu[b]:masks.context_cu[b + 1]]
        cpos = masks.context_idx[masks.context_cu[b]:masks.context_cu[b + 1]]
        tpos = masks.target_idx[masks.target_cu[b]:masks.target_cu[b + 1]]
        ctx = pred.embed(c) + pred.pos_embed[cpos]
        tok = pred.mask_token + pred.pos_embed[tpos]
        parts = [ctx]
        if pred.conditioning == "feature":
            z = torch.cat([tok, action[b].expand(len(tpos), -1)], 1)
            c1, c2, c3 = pred.cond.fc1, pred.cond.fc2, pred.cond.fc3
            tok = c3(F.gelu(c2(F.gelu(c1(z)))))
        parts.append(tok)
        if pred.conditioning == "sequence":
            parts.append(torch.stack([action[b, k] * pred.cond.weight[k] + pred.cond.bias[k]
                                      for k in range(action.shape[1])]))
        x = torch.cat(parts)[None]
        for blk in pred.blocks:
            x = blk(x)
        x = x[0, len(cpos):len(cpos) + len(tpos)]
        outs.append(pred.proj(pred.norm(x)))
    return torch.cat(outs)


@pytest.mark.parametrize("mode", ["feature", "sequence", "none"])
def test_packed_predictor_equals_per_sample_loop(mode):
    cfg = tiny_cfg(mode)
    torch.manual_seed(1)
    model = IWM(cfg).eval()
    images, masks, action = sample(cfg, 4, seed=1)
    context = model.encoder(images, masks)
    out = model.predictor(context, masks, action)
    assert out.shape == (sum(masks.target_counts), 32)
    torch.testing.assert_close(out, predictor_loop(model.predictor, context, masks, action), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode,changes", [("feature", True), ("sequence", True), ("none", False)])
def test_action_changes_prediction_only_when_conditioned(mode, changes):
    cfg = tiny_cfg(mode)
    torch.manual_seed(2)
    model = IWM(cfg).eval()
    images, masks, action = sample(cfg, 3, seed=2)
    with torch.no_grad():
        a = model(images, masks, action)
        b = model(images, masks, action + 1.0)
    assert (not torch.allclose(a, b, atol=1e-6)) == changes


def test_target_encoder_is_fp32_frozen_copy():
    cfg = tiny_cfg()
    enc = Encoder(cfg)
    tgt = make_target_encoder(enc)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in tgt.parameters())
    for (n1, p1), (n2, p2) in zip(enc.named_parameters(), tgt.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()


@pytest.mark.parametrize("name,patch,img", [("vit_tiny", 16, 224), ("vit_small", 14, 224), ("vit_tiny", 14, 98)])
def test_named_sizes_and_patch_sizes(name, patch, img):
    cfg = IWMConfig()
    cfg.data.img_size = img
    cfg.model.encoder, cfg.model.patch_size = name, patch
    cfg.model.predictor_depth = 1
    cfg.validate()
    enc = Encoder(cfg)
    assert enc.grid == (img // patch, img // patch)
    assert enc.embed_dim == {"vit_tiny": 192, "vit_small": 384}[name]


def test_bad_sizes_are_clear_errors():
    from engine.config import ConfigError

    cfg = IWMConfig()
    cfg.data.img_size = 225
    with pytest.raises(ConfigError, match="not divisible by model.patch_size"):
        cfg.validate()
    cfg = IWMConfig()
    cfg.model.conditioning = "film"
    with pytest.raises(ConfigError, match="model.conditioning"):
        cfg.validate()


def test_target_encoder_params_tile_one_flat_buffer():
    from kernels.ema import as_flat_view

    tgt = make_target_encoder(Encoder(tiny_cfg()))
    params = sorted(tgt.parameters(), key=lambda p: p.data_ptr())
    assert as_flat_view(params) is not None
    assert tgt.flat_params.is_intact()
