"""Checkpoints that lose nothing and run nothing foreign: safe loading on every path, manifests and
fall-backs, one run per folder, nothing deleted before a run can start, and clear failures."""
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import FORMAT, CheckpointError, RunDir, load_weights
from tests.helpers import ROOT, read_metrics, tiny_config

STEPS = 8


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker, extra=None):
    torch.save({"format": FORMAT, "payload": Evil(marker), **(extra or {})}, path)


def refresh_manifest(tag_dir):
    """Make the manifest agree with the files (a forger would): only safe loading can stop them now."""
    m = json.loads((tag_dir / "manifest.json").read_text())
    m["files"] = {n: os.path.getsize(tag_dir / n) for n in m["files"]}
    (tag_dir / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    from engine.pretrain import pretrain

    out = tmp_path_factory.mktemp("ckpt") / "run"
    pretrain(tiny_config(out, STEPS, ["train.ckpt_every=4", "train.log_every=1", "train.eval_every=0"]))
    return out


def copy_run(done_run, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(done_run, dst)
    return dst


def resume(out, steps, extra=()):
    from engine.pretrain import pretrain

    return pretrain(tiny_config(out, steps, ["train.ckpt_every=4", "train.log_every=1", "train.eval_every=0",
                                          *extra]))


# ---- 1. nothing read from disk runs code -----------------------------------------------------------------
def test_a_crafted_weights_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="holds code"):
        load_weights(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    p = subprocess.run([sys.executable, "-m", "engine.eval", "mrr", "--ckpt", str(tmp_path / "evil.pt")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank_00000.pt"])
def test_a_crafted_resume_file_is_refused_without_running(done_run, tmp_path, victim):
    out = copy_run(done_run, tmp_path)
    tag = out / "ds" / "step_00000008"
    marker = tmp_path / "pwned"
    plant(tag / victim, marker)
    refresh_manifest(tag)
    with pytest.raises(CheckpointError, match="corrupt or holds code"):
        resume(out, STEPS + 2)
    assert not marker.exists()


# ---- 2. nothing deleted before the run has proved it can start; fall-backs ---------------------------
@pytest.mark.slow
def test_fresh_start_with_bad_data_keeps_everything(done_run, tmp_path):
    from engine.data import DataError
    from engine.pretrain import pretrain

    out = copy_run(done_run, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = tiny_config(out, 4)
    cfg.train.resume = False
    cfg.data.dataset = str(tmp_path / "typo")
    with pytest.raises(DataError, match="does not exist"):
        pretrain(cfg)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {p: b for p, b in before.items() if p.name != ".lock"} == after


@pytest.mark.slow
@pytest.mark.parametrize("latest", ["missing", "dangling"])
def test_missing_or_dangling_latest_resumes_the_newest_complete_tag(done_run, tmp_path, latest):
    out = copy_run(done_run, tmp_path)
    if latest == "missing":
        (out / "ds" / "latest").unlink()
    else:
        (out / "ds" / "latest").write_text("step_99999999")
    result = resume(out, STEPS + 2)
    assert result.step == STEPS + 2
    steps = [int(float(r["step"])) for r in read_metrics(out) if r.get("loss")]
    assert steps == list(range(1, STEPS + 3)), "resumed at step 8, not restarted from 0"


@pytest.mark.slow
def test_a_truncated_newest_tag_falls_back_to_the_previous_one(done_run, tmp_path, caplog):
    out = copy_run(done_run, tmp_path)
    shard = out / "ds" / "step_00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "checkpoint.pt.tmp.4242").write_bytes(b"half a file")  # a kill during a write
    with caplog.at_level("WARNING"):
        result = resume(out, STEPS + 1)
    assert "truncated" in caplog.text and "step_00000004" in caplog.text
    assert result.step == STEPS + 1
    steps = [int(float(r["step"])) for r in read_metrics(out) if r.get("loss")]
    assert steps == list(range(1, STEPS + 2)), "steps 5..8 were retrained from step 4"
    assert not (out / "checkpoint.pt.tmp.4242").exists(), "stale temporary files are cleaned at start"


# ---- 4. one run per folder -----------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_stops_naming_the_holder(tmp_path):
    from engine.pretrain import pretrain

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("31337\n")
        f.flush()
        with pytest.raises(CheckpointError, match="in use by another run .PID 31337"):
            pretrain(tiny_config(out, 2))
    assert not (out / "config.json").exists()


# ---- 5. every failure a message --------------------------------------------------------------------------
@pytest.mark.slow
def test_non_finite_loss_stops_before_a_checkpoint_holds_it(tmp_path, monkeypatch):
    """Checkpoints every 2 steps, logs every 3: a NaN loss at step 4 (a checkpoint step, not a log step, right
    after the step-3 log) must stop the run there, before step 4's checkpoint is written."""
    import engine.pretrain as P
    from engine.run import TrainingDiverged
    from engine.pretrain import pretrain

    real = P.iwm_loss
    calls = []

    def diverging(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 4 else loss  # step 4 only: the meters must remember it

    monkeypatch.setattr(P, "iwm_loss", diverging)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"between step 4 and step 4; the last checkpoint, step 2 .*lower "
                                               r"learning rate"):
        pretrain(tiny_config(out, 6, ["train.ckpt_every=2", "train.log_every=3", "train.eval_every=0"]))
    assert len(calls) == 4, "the run stops at the step whose loss was not finite"
    assert RunDir(str(out)).tags() == ["step_00000002"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [int(float(r["step"])) for r in read_metrics(out) if r.get("loss")] == [3]


@pytest.mark.slow
def test_disk_full_names_the_folder_and_keeps_the_previous_checkpoint(done_run, tmp_path, monkeypatch):
    out = copy_run(done_run, tmp_path)
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"disk full: .*MiB.*previous complete checkpoint is intact"):
        resume(out, STEPS + 4)
    monkeypatch.setattr(torch, "save", real_save)
    run = RunDir(str(out))
    assert run.resume_tag()[0] == "step_00000008"
    assert not (out / "ds" / "step_00000012").exists()


@pytest.mark.slow
def test_another_rank_count_at_another_global_batch_is_a_message(done_run, tmp_path):
    # resuming on another number of ranks reshards (tests/engine/test_reshard.py), but only at the saved global
    # batch: a run saved on 2 ranks x 16 and resumed on 1 x 16 would change it, and says how to keep it
    out = copy_run(done_run, tmp_path)
    manifest = out / "ds" / "step_00000008" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["world_size"] = 2
    manifest.write_text(json.dumps(m))
    config_before = (out / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"global batch of 32 on 2 ranks; 1 ranks x data.batch_size=16 give 16: "
                                              r"keep the global batch with --set optim.global_batch=32"):
        resume(out, STEPS + 2)
    assert (out / "config.json").read_bytes() == config_before, "a failed start does not rewrite config.json"
