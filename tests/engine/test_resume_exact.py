"""kill -9 at a random moment, rerun the same command: the losses and the final weights are the
uninterrupted run's, bit for bit (1 rank with a loader worker, and 2 ranks under the DeepSpeed launcher)."""
import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.distributed import remove_shm_buffers
from tests.helpers import ROOT, TINY, subprocess_env
from tests.helpers import shm_buffers

STEPS = 12


def command(out, ranks, port):
    sets = [a for t in TINY + ["data.num_workers=1", "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0"]
            for a in ("--set", t)]
    tail = ["recipes/pretrain_tiny.py", "--out", str(out), "--steps", str(STEPS), *sets]
    if ranks == 1:
        return [sys.executable, *tail]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(port), *tail]


def env():
    return subprocess_env()


def losses(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return {int(float(r["step"])): r["loss"] for r in csv.DictReader(f) if r.get("loss")}


def logged_steps(out):
    try:
        return max(losses(out), default=0)
    except (OSError, KeyError, ValueError):
        return 0


def weights(out):
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return {f"{part}.{k}": v for part in ("encoder", "predictor", "target_encoder") for k, v in ckpt[part].items()}


def run_to_end(out, ranks, port):
    p = subprocess.run(command(out, ranks, port), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("ranks,trials", [(1, 2), (2, 1)])  # more moments: tests/stress_preempt.py
def test_kill_and_rerun_is_bit_exact(tmp_path, ranks, trials):
    rng = random.Random(1234 + ranks)
    port = 29700 + ranks * 10 + os.getpid() % 50
    ref = tmp_path / "ref"
    run_to_end(ref, ranks, port)
    ref_losses, ref_weights = losses(ref), weights(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    for trial in range(trials):
        out = tmp_path / f"killed_{trial}"
        kill_after = rng.randint(3, STEPS - 2)  # logged steps seen before the kill; the moment itself is random
        p = subprocess.Popen(command(out, ranks, port + 1 + trial), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while logged_steps(out) < kill_after and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.3)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        remove_shm_buffers(port + 1 + trial)  # killed ranks cannot remove their DeepSpeed /dev/shm buffers (66 MB each)
        run_to_end(out, ranks, port + 5 + trial)
        got = losses(out)
        assert got == ref_losses, f"trial {trial}, killed after step {kill_after}: losses differ"
        w = weights(out)
        assert w.keys() == ref_weights.keys()
        for k in w:
            assert torch.equal(w[k], ref_weights[k]), (trial, k)
    left = [n for d in range(8) for n in shm_buffers(port + d)]  # no launch of this test leaves shared memory behind
    assert not left, left
