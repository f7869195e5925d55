"""train.compile: torch.compile of every ViT block (engine.models.compile_blocks) on ragged batches.

The packed token count changes with every batch's masks. The compiled blocks must not recompile per batch
(each compiles at most twice: once for the first shapes, once with the count dynamic), must leave the ragged
attention to its eager backend, and must train as the eager blocks do: compiled (inductor) and eager losses
agree over 20 steps within 1e-4 relative (measured: 2e-6 on CPU; inductor fuses and reorders float
reductions, so exact equality is not expected).
"""
import pytest
import torch

import kernels.attention as attention
from engine.config import ConfigError, IWMConfig
from engine.masks import MaskSampler
from engine.models import IWM, compile_blocks
from kernels.l2_loss import masked_l2_loss

LOSS_RTOL = 1e-4
SETS = ["model.encoder=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
        "model.predictor_depth=2", "model.predictor_width=32", "model.predictor_heads=2", "data.img_size=48",
        "data.batch_size=4", "train.precision=fp32"]


def tiny_config():
    cfg = IWMConfig(name="compile-test")
    for s in SETS:
        cfg.override(s)
    return cfg.validate()


def train(cfg, steps: int, backend=None, on_step=None):
    """Losses of ``steps`` AdamW steps of the IWM networks on random images and the engine's ragged masks."""
    torch.manual_seed(0)
    model = IWM(cfg)
    if backend is not None:
        assert compile_blocks(model, backend) == 4
    sampler = MaskSampler(cfg.masks, *model.encoder.grid)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, s, D = cfg.data.batch_size, cfg.data.img_size, cfg.model.embed_dim
    losses, counts = [], set()
    for i in range(steps):
        images, action = torch.rand(B, 3, s, s, generator=gen), torch.randn(B, cfg.views.action_dim, generator=gen)
        masks = sampler.sample(B, gen)
        counts.add(sum(masks.context_counts))
        loss = masked_l2_loss(model(images, masks, action), torch.randn(B, model.encoder.num_patches, D, generator=gen),
                              masks.flat_target())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step:
            on_step(i)
    return losses, counts


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compile_with_zero3_is_refused_with_the_fix():
    cfg = tiny_config()
    cfg.train.compile, cfg.train.zero_stage = True, 3
    with pytest.raises(ConfigError, match="zero_stage 0-2"):
        cfg.validate()
    cfg.train.zero_stage, cfg.train.compile_backend = 1, "tvm"
    with pytest.raises(ConfigError, match="compile_backend"):
        cfg.validate()


def test_compiled_blocks_do_not_recompile_per_ragged_batch_and_keep_the_eager_attention(monkeypatch):
    # dynamo's guards do not depend on the backend: the 'eager' backend counts the graphs in seconds
    torch._dynamo.reset()
    calls = []
    sdpa = attention._ragged_attention_sdpa
    monkeypatch.setattr(attention, "_ragged_attention_sdpa", lambda *a: calls.append(1) or sdpa(*a))
    seen = {}
    losses, counts = train(tiny_config(), 50, backend="eager", on_step=lambda i: seen.setdefault(i, graphs()))
    assert len(counts) > 10  # the packed count really changed from batch to batch
    blocks = 4
    assert seen[1] <= 4 * blocks  # two graphs per block, compiled twice at most (static, then dynamic)
    assert graphs() == seen[1], f"recompiled after step 2: {seen}"  # nothing new over steps 3..50
    assert len(calls) == 50 * blocks  # every block's attention ran, eagerly, through the backend


@pytest.mark.slow
def test_inductor_compiled_losses_follow_eager_over_20_steps():
    torch._dynamo.reset()
    cfg = tiny_config()
    eager, _ = train(cfg, 20)
    seen = {}
    compiled, _ = train(cfg, 20, backend="inductor", on_step=lambda i: seen.setdefault(i, graphs()))
    assert compiled == pytest.approx(eager, rel=LOSS_RTOL)
    assert compiled != eager  # the compiled graphs really ran (inductor rounds differently)
    assert graphs() == seen[1], f"recompiled after step 2: {seen}"
