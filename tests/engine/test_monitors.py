"""Collapse monitors against plain loops and formulas; the warning; the pretraining task's monitors on a
collapsed and a healthy target encoder."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from engine import monitors as mon
from engine.masks import MaskBatch, MaskSampler
from engine.pretrain import Pretraining
from tests.helpers import tiny_cfg


def ragged(counts, grid=(4, 4), seed=0):
    """A MaskBatch with the given target counts (distinct random positions per sample)."""
    g = torch.Generator().manual_seed(seed)
    tgt = [torch.randperm(grid[0] * grid[1], generator=g)[:n].sort().values for n in counts]
    ctx = [torch.arange(2) for _ in counts]
    return MaskBatch(grid, torch.cat(ctx), torch.cat(tgt), [2] * len(counts), list(counts))


def per_sample(x, counts):
    out, start = [], 0
    for n in counts:
        out.append(x[start:start + n])
        start += n
    return out


def test_target_std_is_the_mean_std_across_images_of_the_layer_normed_features():
    feats = torch.randn(5, 3, 8) * 3 + 1
    ref = 0.0
    for n in range(3):
        for d in range(8):
            vals = [F.layer_norm(feats[b, n], (8,), eps=1e-6)[d].item() for b in range(5)]
            mean = sum(vals) / 5
            ref += math.sqrt(sum((v - mean) ** 2 for v in vals) / 5)
    assert mon.target_std(feats, 1e-6).item() == pytest.approx(ref / 24, rel=1e-5)
    assert mon.target_std(feats[:1].expand(5, 3, 8), 1e-6).item() == pytest.approx(0.0, abs=1e-6)


def test_rankme_formula_and_its_extremes():
    x = torch.randn(40, 6)
    s = torch.linalg.svdvals(x.double())  # the reference: an SVD, not the Gram matrix
    p = s / s.sum() + 1e-7
    assert mon.rankme(x).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert mon.rankme(x[:3]).item() == pytest.approx(
        math.exp(-sum(q * math.log(q) for q in (torch.linalg.svdvals(x[:3].double()) /
                                                  torch.linalg.svdvals(x[:3].double()).sum() + 1e-7).tolist())),
        rel=1e-6)  # fewer rows than columns
    same = torch.randn(1, 6).expand(40, 6)  # every image the same feature: rank 1
    assert mon.rankme(same).item() == pytest.approx(1.0, abs=1e-3)
    assert mon.rankme(torch.eye(6) * 2).item() == pytest.approx(6.0, rel=1e-5)  # equal singular values


def test_pred_spread_and_spatial_r2_against_per_image_loops():
    torch.manual_seed(0)  # float32 arithmetic: a fixed draw keeps the tolerances meaningful
    counts = [3, 5, 2]
    masks = ragged(counts)
    pred, targets = torch.randn(10, 4), torch.randn(10, 4)
    spread, num, den = [], 0.0, 0.0
    for p, t in zip(per_sample(pred, counts), per_sample(targets, counts)):
        spread.append(p.std(0, unbiased=False).mean().item())
        pc, tc = p - p.mean(0), t - t.mean(0)
        num += ((pc - tc) ** 2).sum().item()
        den += (tc ** 2).sum().item()
    assert mon.pred_spread(pred, masks).item() == pytest.approx(sum(spread) / 3, rel=1e-5)
    assert mon.spatial_r2(pred, targets, masks).item() == pytest.approx(1 - num / den, rel=1e-5, abs=1e-6)
    # one prediction per image (whatever it is) explains none of the within-image variance; the targets all of it
    flat = torch.cat([torch.randn(1, 4).expand(n, 4) for n in counts])
    assert mon.spatial_r2(flat, targets, masks).item() == pytest.approx(0.0, abs=1e-6)
    assert mon.pred_spread(flat, masks).item() == pytest.approx(0.0, abs=1e-6)
    assert mon.spatial_r2(targets + torch.randn(3, 4).repeat_interleave(torch.tensor(counts), 0), targets,
                          masks).item() == pytest.approx(1.0)


def test_feature_window_keeps_the_last_batches():
    w = mon.FeatureWindow(3)
    feats = [torch.randn(2, 5, 4) for _ in range(5)]
    for f in feats[:2]:
        w.add(f)
    assert torch.equal(w.features(), torch.cat([f.mean(1) for f in feats[:2]]))
    for f in feats[2:]:
        w.add(f)
    got = {tuple(r.tolist()) for r in w.features()}
    assert got == {tuple(r.tolist()) for f in feats[2:] for r in f.mean(1)}
    assert w.features().shape == (6, 4)


def test_collapse_warning_names_the_monitor_and_the_threshold():
    assert mon.collapse_warning({"target_std": 0.5, "rankme": 40.0}) is None
    line = mon.collapse_warning({"target_std": 0.05, "rankme": 40.0})
    assert "target_std 0.05 < 0.1" in line and "\n" not in line
    assert "rankme 1.2 < 2" in mon.collapse_warning({"target_std": 0.5, "rankme": 1.2})


def task_after_step(conditioning="feature", B=6, seed=0, collapsed=False):
    cfg = tiny_cfg(conditioning)
    cfg.train.monitor_window, cfg.train.monitor_samples = 4, 3
    task = Pretraining(cfg, torch.device("cpu"))
    if collapsed:  # a target encoder that maps every image to the same features (its final norm's bias)
        for p in task.target_encoder.module.parameters():
            p.data.zero_()
        task.target_encoder.module.vit.norm.bias.data.normal_()
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        images = torch.rand(B, 3, 32, 32, generator=g)
        task.step(task.model, images, torch.zeros(B, dtype=torch.long), contextlib.nullcontext)
    return task


def test_pretraining_monitors_on_a_collapsed_target_encoder_warn():
    task = task_after_step(collapsed=True)
    values = task.monitors(task.model, contextlib.nullcontext)
    assert values["target_std"] == pytest.approx(0.0, abs=1e-5)
    assert values["rankme"] < 1.01
    assert "target_std" in mon.collapse_warning(values)


def test_pretraining_monitors_of_a_healthy_step():
    task = task_after_step()
    values = task.monitors(task.model, contextlib.nullcontext)
    assert set(values) == {"target_std", "rankme", "pred_spread", "spatial_r2", "action_effect"}
    assert 0.1 < values["target_std"] <= 1.0
    assert values["rankme"] > 2.0  # 12 random images' pooled features
    assert mon.collapse_warning(values) is None
    # the action effect: the first 3 samples' predictions under their own action vs the next sample's
    last, model = task.last, task.model.eval()
    m = last.masks.head(3)
    with torch.no_grad():
        ctx = model.encoder(last.source_view[:3], m)
        own = model.predictor(ctx, m, last.action[:3])
        other = model.predictor(ctx, m, last.action[1:4])
    assert values["action_effect"] == pytest.approx(((own - other) ** 2).mean().item(), rel=1e-4)
    assert values["action_effect"] > 0


def test_action_effect_is_zero_without_conditioning():
    task = task_after_step("none")
    assert task.monitors(task.model, contextlib.nullcontext)["action_effect"] == 0.0


def test_mask_batch_head_keeps_the_first_samples():
    masks = MaskSampler(tiny_cfg().masks, 4, 4).sample(5, torch.Generator().manual_seed(3))
    h = masks.head(2)
    assert h.context_counts == masks.context_counts[:2] and h.target_counts == masks.target_counts[:2]
    assert torch.equal(h.target_idx, torch.cat(per_sample(masks.target_idx, masks.target_counts)[:2]))
    assert torch.equal(h.context_idx, torch.cat(per_sample(masks.context_idx, masks.context_counts)[:2]))


class FakeTask:
    def __init__(self, values):
        self.values = values

    def monitors(self, module, autocast):
        return dict(self.values)


def test_the_run_core_warns_once_when_the_targets_collapse(tmp_path, caplog):
    from types import SimpleNamespace

    from engine.distributed import DistInfo
    from engine.run import Run

    cfg = tiny_cfg()
    cfg.train.out_dir = str(tmp_path)
    run = Run(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    run.task = FakeTask({"target_std": 0.5, "rankme": 20.0})
    engine = SimpleNamespace(module=None)
    with caplog.at_level("WARNING", logger="iwm"):
        assert run._monitors(engine) == {"rankme": 20.0, "target_std": 0.5}
        assert not caplog.records
        run.task.values["target_std"] = 0.05
        run._monitors(engine)
        run._monitors(engine)
    assert len(caplog.records) == 1 and "target_std 0.05 < 0.1" in caplog.records[0].getMessage()
