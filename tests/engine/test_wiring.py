"""The training loop's wiring, watched by spies over a few real ``pretrain()`` steps and checked against
independent formulas: the views reach the right networks, the schedules move, the EMA averages the weights
the optimizer step produced, the loss is the one at the target positions; and, on two ranks under the
DeepSpeed launcher, gradient accumulation to ``optim.global_batch``."""
import json
import math

import pytest
import torch

import engine.pretrain as P
from engine.ema import TargetEncoder
from engine.models import IWM, Encoder, Predictor
from engine.run import Run, param_groups
from tests.helpers import run_ranks, tiny_config

STEPS, WARMUP = 6, 2  # 160 images / batch 16 = 10 steps per epoch; warmup_epochs 0.2 -> 2 steps
WATCHED = 2  # the first steps whose weights, features, predictions and losses the spies keep


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
           "groups": [], "group_params": None, "target_weights": [], "online_weights": [], "target_feats": [],
           "pred": [], "loss": [], "masks": []}
    mp = pytest.MonkeyPatch()
    real_views, real_call, real_update = P.make_views, TargetEncoder.__call__, TargetEncoder.update
    real_enc, real_pred, real_step = Encoder.forward, Predictor.forward, torch.optim.AdamW.step
    real_iwm, real_pretrain_step, real_run_step = IWM.forward, P.pretrain_step, Run.optimizer_step

    def snapshot(module):
        return {n: p.detach().double().clone() for n, p in module.named_parameters()}

    def views(images, cfg, generator=None):
        out = real_views(images, cfg, generator=generator)
        rec["views"].append([t.clone() if torch.is_tensor(t) else t for t in out])
        return out

    def target_call(self, images):
        rec["target_in"].append(images.clone())
        feats = real_call(self, images)
        if len(rec["target_feats"]) < WATCHED:
            rec["target_feats"].append(feats.detach().clone())
        return feats

    def encoder_forward(self, images, masks=None):
        if masks is not None and torch.is_grad_enabled():  # the online encoder in a training step
            rec["encoder_in"].append(images.clone())
        return real_enc(self, images, masks)

    def iwm_forward(self, source_view, masks, action):
        pred = real_iwm(self, source_view, masks, action)
        if torch.is_grad_enabled() and len(rec["pred"]) < WATCHED:
            rec["pred"].append(pred.detach().clone())
        return pred

    def run_step(self, engine, task, step, *a, **k):  # the run core's optimizer step: weights before and after
        if step == 0:
            rec["target_weights"].append(snapshot(task.target_encoder.module))
            rec["online_weights"].append(snapshot(task.model.encoder))
        out = real_run_step(self, engine, task, step, *a, **k)
        if step == 0:
            rec["target_weights"].append(snapshot(task.target_encoder.module))
            rec["online_weights"].append(snapshot(task.model.encoder))
        return out

    def pretrain_step(*a, **k):
        out = real_pretrain_step(*a, **k)
        if len(rec["loss"]) < WATCHED:
            rec["loss"].append(out.loss.detach().clone())
            rec["masks"].append(out.masks)
        return out

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
    mp.setattr(IWM, "forward", iwm_forward)
    mp.setattr(P, "pretrain_step", pretrain_step)
    mp.setattr(Run, "optimizer_step", run_step)
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


@pytest.mark.slow
def test_the_target_averages_the_weights_after_the_optimizer_step(spied_run):
    """After step 1 the target must be m * init + (1 - m) * the online weights that step produced, m = the EMA
    schedule at step 1; averaging before the optimizer step would leave it at init."""
    rec, _ = spied_run
    init, after_1 = rec["target_weights"]  # the target before and after the run core's first optimizer step
    online_0, online_1 = rec["online_weights"]  # the online encoder, the same two moments
    m = 0.9 + 0.1 * 1 / STEPS  # optim.ema = (0.9, 1.0), linear over the run, after step 1
    for n in init:  # the target starts as a copy of the encoder (to fp32 rounding)
        torch.testing.assert_close(init[n], online_0[n], rtol=0, atol=1e-6, msg=n)
    moved = max(((1 - m) * (online_1[n] - init[n])).abs().max().item() for n in init)
    assert moved > 1e-6, "step 1 must move the online weights"
    err = max((after_1[n] - (m * init[n] + (1 - m) * online_1[n])).abs().max().item() for n in init)
    # fp32 rounding of weights near 1 is about 1e-7; averaging the pre-step weights would be off by ``moved``
    # (the EMA run one step late, with the next step's momentum, still by 0.2 ``moved`` at this schedule)
    assert err < 0.05 * moved and err < 1e-6, (err, moved)


RTOL = 1e-5  # the fp32 loss against the float64 hand computation


def hand_loss(pred, feats, target_idx, target_counts, eps):
    """mean over elements of (pred - layer_norm(target rows))^2, row by row: each sample's feature rows at
    its target positions, normalised without affine parameters (biased variance, eps inside the root)."""
    total, elements, start = 0.0, 0, 0
    for b, count in enumerate(target_counts):
        for j in range(start, start + count):
            row = feats[b, int(target_idx[j])].double()
            target = (row - row.mean()) / torch.sqrt(((row - row.mean()) ** 2).mean() + eps)
            total += ((pred[j].double() - target) ** 2).sum().item()
            elements += row.numel()
        start += count
    return total / elements


@pytest.mark.slow
def test_the_loss_is_taken_at_the_target_positions(spied_run):
    """The loss each step backpropagates against a hand computation from what the spies saw: the predictions
    (one row per target position, sample by sample) and the target encoder's features of y at those positions."""
    rec, _ = spied_run
    eps = 1e-6  # model.target_norm_eps's default
    for loss, pred, feats, masks in zip(rec["loss"], rec["pred"], rec["target_feats"], rec["masks"]):
        B, N, _ = feats.shape
        assert pred.shape[0] == sum(masks.target_counts) and len(masks.target_counts) == B
        want = hand_loss(pred, feats, masks.target_idx, masks.target_counts, eps)
        assert loss.item() == pytest.approx(want, rel=RTOL)
        # near init the predictions are small and every loss is near 1: the rows of the wrong sample must still
        # move it far beyond the tolerance, or this check could not see where the rows come from
        shifted = hand_loss(pred, feats.roll(1, dims=0), masks.target_idx, masks.target_counts, eps)
        assert abs(shifted - want) > 20 * RTOL * want
    assert len(rec["loss"]) == WATCHED


# ---- two ranks, gradient accumulation ----------------------------------------------------------------------
RANKS, MICRO, GLOBAL, ACC_STEPS = 2, 8, 32, 2


@pytest.mark.slow
def test_accumulation_on_two_ranks_reaches_the_global_batch(tmp_path):
    """optim.global_batch on two ranks: DeepSpeed's accumulation and batch, and the
    forward passes each optimizer step runs on each rank, against global_batch / (ranks x batch)."""
    p = run_ranks(["tests/engine/wiring_ranks.py", tmp_path / "run", ACC_STEPS, f"data.batch_size={MICRO}",
                   f"optim.global_batch={GLOBAL}", "train.eval_every=0", "train.log_every=1"], ranks=RANKS, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:]
    accum = GLOBAL // (RANKS * MICRO)
    for rank in range(RANKS):
        seen = json.loads((tmp_path / "run" / f"spy_rank{rank}.json").read_text())
        assert seen["world_size"] == RANKS
        assert seen["gradient_accumulation_steps"] == accum
        assert seen["train_batch_size"] == GLOBAL and seen["train_micro_batch_size_per_gpu"] == MICRO
        assert seen["global_steps"] == ACC_STEPS and seen["result_step"] == ACC_STEPS
        assert seen["batches"] == [MICRO] * (accum * ACC_STEPS)
        # in order: accum forwards, then one update of every parameter group (ZeRO 1-2 step the groups one
        # AdamW call at a time: consecutive calls are one update), ACC_STEPS times
        events = []
        for e in seen["events"]:
            if e.startswith("step") and events and events[-1].startswith("step"):
                events[-1] = f"step {int(events[-1].split()[1]) + int(e.split()[1])}"
            else:
                events.append(e)
        assert events == (["forward"] * accum + [f"step {seen['param_groups']}"]) * ACC_STEPS, seen["events"]


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
