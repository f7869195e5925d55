"""The training loop's wiring, watched by spies over a few real ``pretrain()`` steps and checked against
independent formulas: the views reach the right networks, the schedules move, the EMA is the EMA."""
import math

import pytest
import torch

import engine.pretrain as P
from engine.ema import TargetEncoder
from engine.models import Encoder, Predictor
from engine.run import param_groups
from tests.helpers import tiny_config

STEPS, WARMUP = 6, 2  # 160 images / batch 16 = 10 steps per epoch; warmup_epochs 0.2 -> 2 steps


def expected_lr(s, start=2e-4, peak=2e-3, final=1e-6):
    if s < WARMUP:
        return start + (peak - start) * s / WARMUP
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))


def expected_wd(s, start=0.04, end=0.4):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * s / STEPS))


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory):
    from engine.pretrain import pretrain

    rec = {"views": [], "target_in": [], "encoder_in": [], "actions": [], "momentum": [], "ema_err": [],
           "groups": [], "group_params": None}
    mp = pytest.MonkeyPatch()
    real_views, real_call, real_update = P.make_views, TargetEncoder.__call__, TargetEncoder.update
    real_enc, real_pred, real_step = Encoder.forward, Predictor.forward, torch.optim.AdamW.step

    def views(images, cfg, generator=None):
        out = real_views(images, cfg, generator=generator)
        rec["views"].append([t.clone() if torch.is_tensor(t) else t for t in out])
        return out

    def target_call(self, images):
        rec["target_in"].append(images.clone())
        return real_call(self, images)

    def encoder_forward(self, images, masks=None):
        if masks is not None and torch.is_grad_enabled():  # the online encoder in a training step
            rec["encoder_in"].append(images.clone())
        return real_enc(self, images, masks)

    def predictor_forward(self, context, masks, action):
        if torch.is_grad_enabled():
            rec["actions"].append(action.clone())
        return real_pred(self, context, masks, action)

    def update(self, momentum):
        before = {n: p.double().clone() for n, p in self.module.named_parameters()}
        online = {n: p.double().clone() for n, p in self.online.named_parameters()}
        real_update(self, momentum)
        rec["momentum"].append(momentum)
        rec["ema_err"].append(max((p.double() - (momentum * before[n] + (1 - momentum) * online[n])).abs().max().item()
                                  for n, p in self.module.named_parameters()))

    def optimizer_step(self, *a, **k):
        rec["groups"].append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
        if rec["group_params"] is None:
            rec["group_params"] = [list(g["params"]) for g in self.param_groups]
        return real_step(self, *a, **k)

    mp.setattr(P, "make_views", views)
    mp.setattr(TargetEncoder, "__call__", target_call)
    mp.setattr(TargetEncoder, "update", update)
    mp.setattr(Encoder, "forward", encoder_forward)
    mp.setattr(Predictor, "forward", predictor_forward)
    mp.setattr(torch.optim.AdamW, "step", optimizer_step)
    cfg = tiny_config(tmp_path_factory.mktemp("wiring"), STEPS,
                      ["train.zero_stage=0", "optim.warmup_epochs=0.2", "optim.ema=(0.9, 1.0)",
                       "train.eval_every=0", "train.ckpt_every=100"])
    try:
        result = pretrain(cfg)
    finally:
        mp.undo()
    return rec, result


@pytest.mark.slow
def test_each_network_gets_its_view_and_the_action(spied_run):
    rec, _ = spied_run
    assert len(rec["views"]) == STEPS and len(rec["target_in"]) >= STEPS
    for (source, target, action, _, _), t_in, e_in, a_in in zip(rec["views"], rec["target_in"], rec["encoder_in"],
                                                                rec["actions"]):
        assert torch.equal(t_in, target), "the target encoder must see the target view y"
        assert torch.equal(e_in, source), "the online encoder must see the source view x"
        assert torch.equal(a_in, action), "the predictor must get the views' action"
        assert not torch.equal(source, target)


@pytest.mark.slow
def test_lr_weight_decay_and_momentum_follow_their_schedules(spied_run):
    rec, _ = spied_run
    assert len(rec["groups"]) == STEPS
    for s, groups in enumerate(rec["groups"]):
        (lr_d, wd_d), (lr_n, wd_n) = groups
        assert lr_d == pytest.approx(expected_lr(s)) and lr_n == pytest.approx(expected_lr(s))
        assert wd_d == pytest.approx(expected_wd(s))
        assert wd_n == 0.0, "biases and 1-D parameters get no weight decay"
    assert rec["momentum"] == pytest.approx([0.9 + 0.1 * (s + 1) / STEPS for s in range(STEPS)])
    assert max(rec["ema_err"]) < 1e-6


@pytest.mark.slow
def test_decay_group_holds_matrices_and_no_decay_group_biases_and_norms(spied_run):
    rec, _ = spied_run
    decay, no_decay = rec["group_params"]
    assert decay and no_decay
    assert all(p.ndim >= 2 for p in decay)
    assert all(p.ndim <= 1 for p in no_decay)


def test_param_groups_membership_by_name():
    from tests.helpers import tiny_cfg
    from engine.models import IWM

    model = IWM(tiny_cfg())
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for p in no_decay["params"]:
        assert names[id(p)].endswith(".bias") or p.ndim == 1, names[id(p)]
    assert any(names[id(p)].endswith("mask_token") for p in no_decay["params"])
    assert all(names[id(p)].endswith(".weight") and p.ndim >= 2 for p in decay["params"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.vit.pos_embed"}
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())
