"""Resume on another number of ranks, 2 -> 1 and 1 -> 2, at ZeRO-1 and ZeRO-3 (DeepSpeed universal checkpoints).

For each stage: an uninterrupted run on 1 rank (in this process) and on 2 ranks (the ``deepspeed`` launcher), 6
steps, checkpoints at 3 and 6, the same global batch (1 rank accumulates 2 micro-batches). Each is copied, its
step-6 checkpoint removed, and the copy resumed on the other count to step 6. A resumed run saves its state in
the new layout at once; that step-3 checkpoint must hold exactly what the old count saved (every parameter's fp32
weights and AdamW moments, merged by DeepSpeed's ds_to_universal; the EMA target encoder, merged from its
per-rank slices by the plain rule below; the step). The losses after the resume stay within LOSS_RTOL of the
uninterrupted run on the new count: they differ because the first three steps ran on another count (other views
and masks per rank) and the new ranks' random streams restart at the resume; measured: at most 0.93% (ZeRO-1 and 3).
"""
import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import convert_to_universal
from engine.config import load_recipe
from tests.helpers import ROOT, TINY, subprocess_env

STEPS, SAVED = 6, 3
LOSS_RTOL = 0.03
EXTRA = ["optim.global_batch=32", "train.ckpt_every=3", "train.log_every=1", "train.eval_every=0",
         "data.num_workers=0"]


def run(out, ranks, stage, steps=STEPS, port=0):
    extra = EXTRA + [f"train.zero_stage={stage}"]
    if ranks == 1:  # in this process: the recipe the launches run, with the same overrides
        from engine.pretrain import pretrain

        cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_tiny.py"), TINY + extra)
        cfg.train.out_dir, cfg.optim.max_steps = str(out), steps
        pretrain(cfg.validate())
        return
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(29900 + 10 * stage + port + os.getpid() % 89), "tests/engine/pretrain_ranks.py", str(out), str(steps),
           *TINY, *extra]
    p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        raise
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]


def losses(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def tag(out, step=SAVED):
    return os.path.join(out, "ds", f"step_{step:08d}")


def universal(folder, tmp):
    """{parameter: {fp32, exp_avg, exp_avg_sq, step}} of a tag, through DeepSpeed's converter."""
    out = os.path.join(tmp, os.path.basename(os.path.dirname(os.path.dirname(folder))))
    convert_to_universal(folder, out)
    zero = os.path.join(out, "zero")
    state = {}
    for name in sorted(os.listdir(zero)):
        if os.path.isdir(os.path.join(zero, name)):
            files = {f[:-3]: torch.load(os.path.join(zero, name, f), weights_only=False)
                     for f in os.listdir(os.path.join(zero, name))}
            state[name] = {k: (v["param"] if isinstance(v, dict) else v) for k, v in files.items()}
    return state


def saved_target(folder, shapes):
    """The EMA target encoder a tag holds: whole in its client state (ZeRO 0-2), or rank r's slices of every
    parameter (ZeRO-3: its elements zero-padded to a multiple of the ranks, cut into equal consecutive pieces)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith("model_states.pt"))
    clients = [torch.load(os.path.join(folder, f), weights_only=False)["client"] for f in files]
    first = clients[0]["target_encoder"]
    if "target_encoder_shard" not in first:
        return first
    shards, out, offset = [c["target_encoder"]["target_encoder_shard"] for c in clients], {}, 0
    for name, shape in shapes.items():
        n = shape.numel()
        per = -(-n // len(shards))
        out[name] = torch.cat([s[offset:offset + per] for s in shards])[:n].reshape(shape)
        offset += per
    return out


@pytest.fixture(scope="module", params=[1, 3], ids=["zero1", "zero3"])
def resumed(request, tmp_path_factory):
    stage, root = request.param, tmp_path_factory.mktemp(f"reshard{request.param}")
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = root / f"ranks{ranks}"
        run(runs[ranks], ranks, stage)
    for old, new in ((2, 1), (1, 2)):
        out = root / f"from{old}to{new}"
        shutil.copytree(runs[old], out)
        shutil.rmtree(tag(out, STEPS))  # as if stopped after the step-3 checkpoint
        run(out, new, stage, port=5)
        runs[old, new] = out
    return stage, runs, root


@pytest.mark.slow
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_resharded_state_equals_the_saved_one(resumed, old, new):
    stage, runs, root = resumed
    before = universal(tag(runs[old]), str(root / f"u_before_{old}{new}"))
    after = universal(tag(runs[old, new]), str(root / f"u_after_{old}{new}"))
    assert before.keys() == after.keys() and len(before) > 30
    for name in before:  # every trained parameter has its moments (the fixed position table has none)
        assert before[name].keys() == after[name].keys(), name
        assert before[name].keys() >= {"fp32", "exp_avg", "exp_avg_sq"} or name.endswith("pos_embed"), name
        for k in before[name]:
            assert torch.equal(before[name][k], after[name][k]), (stage, name, k)
    shapes = {k: v.shape for k, v in torch.load(runs[old] / "checkpoint.pt", weights_only=True)["target_encoder"].items()}
    a, b = saved_target(tag(runs[old]), shapes), saved_target(tag(runs[old, new]), shapes)
    assert a.keys() == b.keys() == shapes.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    files = os.listdir(tag(runs[old, new]))
    assert sum(f.startswith("rng_rank_") for f in files) == new  # saved in the new count's layout


@pytest.mark.slow
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_resumed_losses_follow_the_new_count(resumed, old, new):
    stage, runs, _ = resumed
    got, source, ref = losses(runs[old, new]), losses(runs[old]), losses(runs[new])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == source[s] for s in range(1, SAVED + 1))  # the history before the resume is kept
    for s in range(SAVED + 1, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=LOSS_RTOL), (stage, s, got[s], ref[s])
    assert torch.load(runs[old, new] / "checkpoint.pt", weights_only=True)["step"] == STEPS
