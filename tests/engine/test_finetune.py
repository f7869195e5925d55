"""Finetuning building blocks against plain references: per-sample stochastic depth on packed batches, the
attentive head, the all-visible/all-predicted mask, layer-wise LR decay, the config section."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, IWMConfig
from engine.models import RaggedAttention, RaggedBlock, RaggedLayout


def _sample_reference(blk, xb):
    """One sample alone, dense (timm's own attention path): the attention and MLP branches."""
    a = blk.attn(blk.norm1(xb[None]))[0]
    return a, lambda h: blk.mlp(blk.norm2(h[None]))[0]


def test_stochastic_depth_drops_whole_samples_of_a_packed_batch():
    torch.manual_seed(0)
    p = 0.5
    blk = RaggedBlock(16, 2, qkv_bias=True, drop_path=p, attn_layer=RaggedAttention).train()
    seqlens = [3, 5, 2, 4, 1, 6]
    x = torch.randn(1, sum(seqlens), 16)
    starts = [sum(seqlens[:i]) for i in range(len(seqlens))]
    kept = []  # (attention kept, mlp kept) per sample and draw
    with torch.no_grad():
        refs = []
        for s, n in zip(starts, seqlens):
            xb = x[0, s:s + n]
            a, mlp = _sample_reference(blk, xb)
            cands = {}
            for k1 in (0, 1):
                h = xb + k1 * a / (1 - p)
                for k2 in (0, 1):
                    cands[(k1, k2)] = h + k2 * mlp(h) / (1 - p)
            refs.append(cands)
        for _ in range(40):
            out = blk(x, attn_mask=RaggedLayout(seqlens))[0]
            for b, (s, n) in enumerate(zip(starts, seqlens)):
                match = [k for k, ref in refs[b].items() if torch.allclose(out[s:s + n], ref, atol=1e-5)]
                assert len(match) == 1, f"sample {b}: its tokens must all be kept or all dropped, per branch"
                kept.append(match[0])
    rate = sum(k1 + k2 for k1, k2 in kept) / (2 * len(kept))
    assert abs(rate - (1 - p)) < 0.1, rate
    # samples of one draw get different decisions (timm's DropPath would drop the whole packed batch)
    per_draw = [kept[i:i + len(seqlens)] for i in range(0, len(kept), len(seqlens))]
    assert any(len(set(d)) > 1 for d in per_draw)


def test_stochastic_depth_is_off_in_eval_and_dense_batches_use_timm():
    torch.manual_seed(0)
    blk = RaggedBlock(16, 2, qkv_bias=True, drop_path=0.5, attn_layer=RaggedAttention).eval()
    x = torch.randn(1, 7, 16)
    with torch.no_grad():
        out = blk(x, attn_mask=RaggedLayout([3, 4]))[0]
        a, mlp = _sample_reference(blk, x[0, :3])
        h = x[0, :3] + a
        assert torch.allclose(out[:3], h + mlp(h), atol=1e-5)


def test_model_drop_path_is_accepted_and_validated():
    cfg = IWMConfig()
    cfg.model.drop_path = 0.1
    cfg.validate()
    cfg.model.drop_path = 1.0
    with pytest.raises(ConfigError, match="drop_path"):
        cfg.validate()


def test_attentive_head_matches_a_plain_cross_attention():
    from engine.heads import AttentiveHead

    torch.manual_seed(0)
    B, N, D, H, C = 3, 5, 16, 4, 7
    head = AttentiveHead(D, H, C)
    tokens = torch.randn(B, N, D)
    with torch.no_grad():
        got = head(tokens)
        want = []
        for b in range(B):
            x = F.layer_norm(tokens[b], (D,), head.norm1.weight, head.norm1.bias)
            q = head.query[0, 0] @ head.q.weight.T + head.q.bias  # [D]
            kv = x @ head.kv.weight.T + head.kv.bias  # [N, 2D]
            k, v = kv[:, :D], kv[:, D:]
            outs = []
            for h in range(H):
                sl = slice(h * D // H, (h + 1) * D // H)
                w = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(D // H), 0)  # [N]
                outs.append(w @ v[:, sl])
            y = head.query[0, 0] + head.proj(torch.cat(outs))
            y = y + head.mlp(head.norm2(y))
            want.append(head.linear(y))
        assert torch.allclose(got, torch.stack(want), atol=1e-5)


def test_a_narrow_attentive_head_starts_like_a_384_wide_one():
    """V-JEPA's N(0, 0.02^2) weights make a 48-wide head's first logits about 16x smaller than a 384-wide one's
    (the ln(C) plateau of tiny probes); the engine keeps the 384-wide gain below 384 and V-JEPA's std above."""
    from engine.heads import AttentiveHead

    def logit_spread(dim):
        torch.manual_seed(0)
        head = AttentiveHead(dim, 4, 10)
        tokens = torch.randn(512, 16, dim)
        with torch.no_grad():
            return head(tokens).std().item()

    ratio = logit_spread(48) / logit_spread(384)
    assert 0.5 < ratio < 2.0, ratio
    torch.manual_seed(0)
    wide = AttentiveHead(768, 8, 10)
    for layer in (wide.q, wide.kv, wide.proj, wide.mlp.fc1, wide.linear):
        assert abs(layer.weight.std().item() - 0.02) < 0.001, layer  # V-JEPA's head at the paper's widths
    assert abs(wide.mlp.fc2.weight.std().item() - 0.02) < 0.001


def test_all_patches_mask_and_predictor_on_every_position():
    from engine.masks import all_patches_masks
    from engine.models import predict_all
    from engine.views import identity_action
    from engine.models import Predictor

    cfg = IWMConfig()
    for a in ("model.predictor_depth=2", "model.predictor_width=32", "model.predictor_heads=4"):
        cfg.override(a)
    torch.manual_seed(0)
    grid = (3, 2)
    masks = all_patches_masks(2, grid, "cpu")
    assert masks.context_counts == masks.target_counts == [6, 6]
    assert masks.target_idx.tolist() == list(range(6)) * 2
    assert masks.context_idx.tolist() == list(range(6)) * 2
    pred = Predictor(cfg, 24, grid, cfg.views.action_dim).eval()
    tokens = torch.randn(2, 6, 24)
    action = identity_action(2, cfg.views, "cpu")
    with torch.no_grad():
        both = predict_all(pred, tokens, action, grid)
        for b in range(2):  # each sample alone gives the same: packing does not mix samples
            alone = predict_all(pred, tokens[b:b + 1], action[b:b + 1], grid)
            assert torch.allclose(both[b], alone[0], atol=1e-5)
    assert both.shape == (2, 6, 24)


def tiny_finetune_cfg(protocol="encoder", **ft):
    cfg = IWMConfig()
    for a in ("data.img_size=32", "data.batch_size=8", "data.num_workers=0", "data.embedded_per_class=4",
              "data.embedded_native_size=32", "model.encoder='custom'", "model.embed_dim=32", "model.depth=3",
              "model.num_heads=4", "model.patch_size=8", "model.predictor_depth=2", "model.predictor_width=32",
              "model.predictor_heads=4", f"finetune.protocol='{protocol}'"):
        cfg.override(a)
    for k, v in ft.items():
        setattr(cfg.finetune, k, v)
    return cfg.validate()


def test_layer_wise_lr_decay_and_predictor_lr():
    from engine.finetune import Finetuning
    from engine.run import Schedule

    cfg = tiny_finetune_cfg("end_to_end", layer_decay=0.5, predictor_lr_scale=0.1)
    task = Finetuning(cfg, torch.device("cpu"))
    groups = task.param_groups(0.05)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    depth = 3
    for name, p in task.model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.vit.blocks."):
            i = int(name.split(".")[3])
            want = 0.5 ** (depth - i)  # the last block 0.5, the first 0.125
        elif name.startswith("encoder.vit.norm."):
            want = 1.0
        elif name.startswith("encoder."):
            want = 0.5 ** (depth + 1)  # patch embedding
        elif name.startswith("predictor."):
            want = 0.1
        else:
            want = 1.0
        assert scale_of[id(p)] == pytest.approx(want), name
        assert wd_of[id(p)] == (0.0 if p.ndim <= 1 or name.endswith(".bias") else 0.05), name
    opt = torch.optim.AdamW(groups, lr=0.0)
    sched = Schedule(total=10, warmup=0, steps_per_epoch=10)
    lr, _ = sched.apply(opt, cfg, 0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])


def test_frozen_encoder_protocols_train_only_what_they_should():
    from engine.finetune import Finetuning

    for protocol, trained in [("predictor", {"predictor", "head"}), ("linear", {"head"}),
                              ("attentive", {"head"}), ("encoder", {"encoder", "head"}),
                              ("end_to_end", {"encoder", "predictor", "head"})]:
        task = Finetuning(tiny_finetune_cfg(protocol), torch.device("cpu"))
        parts = {n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad}
        assert parts == trained, protocol
        task.model.train()
        assert task.model.encoder.training == (protocol in ("encoder", "end_to_end"))


def test_random_predictor_gets_the_full_lr():
    from engine.finetune import Finetuning

    task = Finetuning(tiny_finetune_cfg("predictor", predictor_init="random"), torch.device("cpu"))
    assert {g["lr_scale"] for g in task.param_groups(0.05)} == {1.0}


@pytest.mark.parametrize("field,value", [("protocol", "probe"), ("predictor_init", "zeros"), ("layer_decay", 0.0),
                                         ("mixup", -1.0), ("crop_scale", (0.5, 0.1)), ("head", "cls")])
def test_finetune_config_refuses_bad_values(field, value):
    cfg = IWMConfig()
    setattr(cfg.finetune, field, value)
    with pytest.raises(ConfigError, match=f"finetune.{field}"):
        cfg.validate()


def test_set_reaches_the_finetune_section():
    cfg = IWMConfig()
    cfg.override("finetune.protocol=predictor")
    cfg.override("finetune.layer_decay=0.75")
    cfg.override("finetune.crop_scale=[0.2, 1.0]")
    assert (cfg.finetune.protocol, cfg.finetune.layer_decay, cfg.finetune.crop_scale) == ("predictor", 0.75,
                                                                                          (0.2, 1.0))
    assert IWMConfig.from_dict(cfg.to_dict()).finetune == cfg.finetune


def test_topk_counts():
    from engine.finetune import topk_correct

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    assert topk_correct(logits, labels, ks=(1, 2)) == {1: 1, 2: 2}


# ---- what the protocols feed the networks ------------------------------------------------------------------
# The identity action written out from the action's layout (engine/views.py's module docstring): the inverse
# of "no jitter" has factors 1 and hue 0, and under jitter_order='random' it runs the canonical order reversed
# (hue first, then saturation, contrast, brightness: ranks 3/3, 2/3, 1/3, 0/3 for brightness, contrast,
# saturation, hue); no destructive op (blur, blur sigma, grayscale, solarize all 0).
IDENTITY = {"random": [1.0, 1.0, 1.0, 0.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0, 0.0],
            "fixed": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]}


@pytest.mark.parametrize("protocol", ["predictor", "end_to_end"])
@pytest.mark.parametrize("order", ["random", "fixed"])
def test_the_predictor_protocols_feed_the_identity_action(monkeypatch, protocol, order):
    import contextlib

    from engine.finetune import Finetuning
    from engine.models import Predictor
    from engine.views import make_views

    cfg = tiny_finetune_cfg(protocol)
    cfg.views.jitter_order = order
    task = Finetuning(cfg, torch.device("cpu"))
    fed, real = [], Predictor.forward
    monkeypatch.setattr(Predictor, "forward", lambda self, ctx, masks, action: fed.append(action.clone())
                        or real(self, ctx, masks, action))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    task.step(task.model, images, torch.tensor([0, 1, 2, 3]), contextlib.nullcontext)  # the training step's path
    assert len(fed) == 1
    want = torch.tensor(IDENTITY[order]).expand(4, -1)
    torch.testing.assert_close(fed[0], want, rtol=0, atol=1e-7)
    # the same vector is the action of views where nothing was applied (every probability 0: x = y)
    still = dataclasses.replace(cfg.views, jitter_p=0.0, blur_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    source, target, action, _, _ = make_views(images, still, generator=torch.Generator().manual_seed(0))
    assert torch.equal(source, target)
    torch.testing.assert_close(action, want, rtol=0, atol=1e-7)


def _source_checkpoint(path, cfg, seed):
    """A pretraining checkpoint of ``cfg``'s network drawn under ``seed`` (target encoder != encoder)."""
    from engine import checkpoint as ckpt_lib
    from engine.models import IWM, Encoder

    torch.manual_seed(seed)
    model, target = IWM(cfg), Encoder(cfg)
    ckpt_lib.save_weights(str(path), config=cfg.to_dict(), step=7, encoder=model.encoder, predictor=model.predictor,
                          target_encoder=target)
    return ckpt_lib.load_weights(str(path))


def _equal(state, module):
    return {k: torch.equal(v, state[k]) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_the_control_predictor_starts_from_random_weights(tmp_path, init):
    """finetune.predictor_init='random' with a pretrained checkpoint: the predictor is a fresh draw under the run's
    seed, not the checkpoint's (every randomly initialised tensor differs from it), and the encoder is still the
    checkpoint's (target) encoder. 'pretrained' loads both (the contrast that shows the check can tell)."""
    from engine.finetune import Finetuning, build_model, load_source

    saved = _source_checkpoint(tmp_path / "checkpoint.pt", tiny_finetune_cfg("predictor"), seed=123)
    cfg = tiny_finetune_cfg("predictor", predictor_init=init, checkpoint=str(tmp_path / "checkpoint.pt"))
    task = Finetuning(cfg, torch.device("cpu"), 0, load_source(cfg))
    assert all(_equal(saved["target_encoder"], task.model.encoder).values()), "the encoder is loaded"
    assert not all(_equal(saved["encoder"], task.model.encoder).values()), "finetune.encoder_weights='target'"
    same = _equal(saved["predictor"], task.model.predictor)
    if init == "pretrained":
        assert all(same.values())
        return
    drawn = [k for k, v in task.model.predictor.state_dict().items() if v.dim() >= 2 and v.std() > 0
             and "pos_embed" not in k]  # the randomly initialised matrices (not the fixed sin-cos positions)
    assert drawn and not any(same[k] for k in drawn), [k for k in drawn if same[k]]
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg, None, len(task.classes))
    assert all(_equal(fresh.predictor.state_dict(), task.model.predictor).values()), "a fresh draw under the seed"
