"""Networks: packed ragged forward passes against per-sample dense loops; conditioning modes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from engine.config import IWMConfig
from engine.masks import MaskSampler
from engine.models import IWM, Encoder, sincos_2d
from tests.helpers import tiny_cfg


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


def offsets(counts):
    """[0, c0, c0+c1, ...]: where each sample's slice of a packed tensor starts."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def encoder_loop(enc: Encoder, images, masks):
    """Plain per-sample forward: normalise, gather one sample's context patches, run timm blocks densely."""
    outs = []
    x_all = enc.vit.patch_embed((images - IMAGENET_MEAN) / IMAGENET_STD) + enc.vit.pos_embed
    cu = offsets(masks.context_counts)
    for b in range(images.shape[0]):
        idx = masks.context_idx[cu[b]:cu[b + 1]]
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
        cc, tc = offsets(masks.context_counts), offsets(masks.target_counts)
        c = context[cc[b]:cc[b + 1]]
        cpos = masks.context_idx[cc[b]:cc[b + 1]]
        tpos = masks.target_idx[tc[b]:tc[b + 1]]
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


@pytest.mark.parametrize("position", ["before", "after", "residual"])
def test_feature_conditioning_position_options_follow_their_formulas(position):
    """model.cond_position: MLP([mask + pos, a]) | MLP([mask, a]) + pos | (mask + pos) + MLP([mask + pos, a])."""
    cfg = tiny_cfg("feature")
    cfg.model.cond_position = position
    torch.manual_seed(3)
    pred = IWM(cfg).predictor
    _, masks, action = sample(cfg, 3, seed=3)
    c = pred.cond
    pos = pred.pos_embed[masks.target_idx]  # [Tt, W]
    a = action[masks.target_batch]

    def mlp(tok):
        return c.fc3(F.gelu(c.fc2(F.gelu(c.fc1(torch.cat([tok, a], 1))))))

    tok = pred.mask_token + pos
    ref = {"before": mlp(tok), "after": mlp(pred.mask_token.expand_as(pos)) + pos, "residual": tok + mlp(tok)}
    torch.testing.assert_close(pred.mask_tokens(masks, action), ref[position], atol=1e-6, rtol=1e-5)


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


def test_images_are_normalised_once_with_imagenet_statistics():
    """The patch embedding sees (x - mean) / std of the [0, 1] view: once, not twice, not never."""
    cfg = tiny_cfg()
    enc = Encoder(cfg).eval()
    seen = []
    enc.vit.patch_embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc(images)
    torch.testing.assert_close(seen[0], (images - IMAGENET_MEAN) / IMAGENET_STD)


@pytest.mark.parametrize("mode", ["feature", "sequence"])
def test_activation_checkpointing_gives_equal_loss_and_gradients(mode):
    cfg = tiny_cfg(mode)
    images, masks, action = sample(cfg, 3, seed=4)
    grads = []
    for ckpt in (False, True):
        cfg.train.activation_checkpointing = ckpt
        torch.manual_seed(0)
        model = IWM(cfg)
        out = model(images, masks, action)
        (out.float() ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def _loss_and_grads(model, images, masks, action):
    """The prediction loss of the online networks plus the dense (target-encoder-style) forward, and
    every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    pred = model(images, masks, action)                # packed ragged blocks
    dense = model.encoder(images)                      # dense [B, N, D] blocks
    loss = (pred.float() ** 2).mean() + (dense.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_fused_layer_norm_blocks_are_timm_blocks_bit_for_bit(monkeypatch, drop_path):
    # every block runs norm1 -> qkv and norm2 -> fc1 through kernels.layer_norm_linear; on CPU that must
    # be exactly timm's LayerNorm + Linear (and the block timm's Block): equal losses and gradients
    # (torch.equal) with the fusion switched off, dense and packed, with per-sample stochastic depth
    import engine.models as models
    from engine.models import RaggedBlock
    calls, op = [], models.layer_norm_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return op(*args, **kwargs)

    monkeypatch.setattr(models, "layer_norm_linear", counting)
    cfg = tiny_cfg("feature")
    cfg.model.drop_path = drop_path
    images, masks, action = sample(cfg, 3, seed=5)
    torch.manual_seed(0)
    model = IWM(cfg)
    blocks = [m for m in model.modules() if isinstance(m, RaggedBlock)]
    assert len(blocks) == 4 and all(b.fuse_layer_norm for b in blocks)
    torch.manual_seed(1)
    fused = _loss_and_grads(model, images, masks, action)
    assert len(calls) == 2 * (len(blocks) + cfg.model.depth)  # the packed pass's blocks, then the dense encoder's
    for b in blocks:
        b.fuse_layer_norm = False
    torch.manual_seed(1)
    plain = _loss_and_grads(model, images, masks, action)
    assert len(calls) == 2 * (len(blocks) + cfg.model.depth)  # the unfused pass made none
    assert torch.equal(fused[0], plain[0])
    assert fused[1].keys() == plain[1].keys() and len(fused[1]) > 20
    for n in fused[1]:
        assert torch.equal(fused[1][n], plain[1][n]), n


def test_fused_layer_norm_blocks_under_triton_match_the_reference():
    # the same networks with the Triton kernels (interpreter): the block wiring (qkv layout, the MLP
    # after fc1) against the reference path. fp32 tolerance: 1e-4 of each tensor's largest entry.
    from kernels import dispatch
    cfg = tiny_cfg("feature")
    images, masks, action = sample(cfg, 2, seed=6)
    torch.manual_seed(0)
    model = IWM(cfg)
    ref = _loss_and_grads(model, images, masks, action)
    with dispatch.backend("triton", attention="reference"):
        fused = _loss_and_grads(model, images, masks, action)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-4, atol=0)
    for n in ref[1]:
        torch.testing.assert_close(fused[1][n], ref[1][n], rtol=0, atol=1e-4 * ref[1][n].abs().max().item(), msg=n)


def test_zero3_is_told_of_the_fused_blocks_parameters():
    # each block's forward reads its LayerNorms' and projections' parameters outside their modules:
    # IWM.external_parameters names them (else ZeRO-3 would not gather them)
    from engine.models import RaggedBlock
    model = IWM(tiny_cfg("feature"))
    pairs = {(id(m), id(p)) for m, p in model.external_parameters()}
    for blk in (m for m in model.modules() if isinstance(m, RaggedBlock)):
        for mod in (blk.norm1, blk.attn.qkv, blk.norm2, blk.mlp.fc1):
            for p in mod.parameters():
                assert (id(blk), id(p)) in pairs
