"""Training end to end: a short run whose loss falls, resume, the eval CLI on its checkpoint, and
DeepSpeed with two CPU ranks (gloo) under the real launcher."""
import json
import os
import shutil

import pytest
import torch

from tests.helpers import eval_in_process, read_metrics, run_eval, tiny_config, write_folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from engine.pretrain import pretrain

    out = tmp_path_factory.mktemp("run")
    result = pretrain(tiny_config(out, 40))
    return out, result


@pytest.mark.slow
def test_short_run_loss_decreases(trained_run):
    out, result = trained_run
    losses = [float(r["loss"]) for r in read_metrics(out) if r.get("loss")]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses  # the method's context block: a harder task
    assert result.step == 40
    for name in ("checkpoint.pt", "metrics.csv", "curves.png", "config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.path.isdir(os.path.join(out, "tensorboard"))
    assert 0.0 < result.mrr <= 1.0


MONITORS = ("target_std", "rankme", "pred_spread", "spatial_r2", "action_effect")


@pytest.mark.slow
def test_collapse_monitors_in_the_csv_and_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained_run
    rows = [r for r in read_metrics(out) if r.get("loss")]
    for r in rows:  # every log step
        v = {k: float(r[k]) for k in MONITORS}
        assert 0 < v["target_std"] <= 1 and 1 <= v["rankme"] <= 48, v  # at most the encoder width
        assert v["spatial_r2"] <= 1 and v["pred_spread"] >= 0 and v["action_effect"] >= 0, v
    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    for k in MONITORS:
        assert len(acc.Scalars(k)) == len(rows), k


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained_run, tmp_path):
    from engine.pretrain import pretrain

    out, _ = trained_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    result = pretrain(tiny_config(copy, 50))
    assert result.step == 50
    steps = [int(float(r["step"])) for r in read_metrics(copy) if r.get("loss")]
    assert steps == list(range(2, 51, 2)), "metrics history must continue without gaps or repeats"
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 50


@pytest.mark.slow
def test_resume_with_a_different_model_is_refused(trained_run, tmp_path):
    from engine.checkpoint import CheckpointError
    from engine.pretrain import pretrain

    out, _ = trained_run
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    with pytest.raises(CheckpointError, match="different model config"):
        pretrain(tiny_config(copy, 60, ["model.predictor_depth=3"]))


@pytest.mark.slow
def test_eval_cli_on_the_checkpoint(trained_run, tmp_path):
    out, _ = trained_run
    p = run_eval("mrr", "--ckpt", str(out), "--images", "2", "--candidates", "8", "--per-op", "2",
                 "--out", str(tmp_path / "m.json"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    assert 0 < res["mrr"] <= 1 and res["candidates"] == 8 and res["images"] == 2
    assert "MRR" in p.stdout and res["spatial_r2"] <= 1 and res["pred_spread"] >= 0 and "spatial R^2" in p.stdout
    from engine.eval import JITTER_OPS, PER_OP_CANDIDATES, chance_mrr
    assert list(res["per_op"]) == list(JITTER_OPS) + ["all"]
    assert all(abs(r["chance"] - chance_mrr(PER_OP_CANDIDATES)) < 1e-9 for r in res["per_op"].values())
    assert f"2 images x {PER_OP_CANDIDATES} candidates" in p.stdout
    p = eval_in_process("linear", "--ckpt", str(out / "checkpoint.pt"), "--epochs", "20", "--out", str(tmp_path / "l.json"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "l.json").read_text())
    assert res["classes"] == 10 and 0 <= res["val_top1"] <= 100


@pytest.mark.slow
def test_eval_cli_on_folders_and_bad_input(trained_run, tmp_path):
    out, _ = trained_run
    train_dir = write_folder(tmp_path / "train")
    val_dir = write_folder(tmp_path / "val", bad=False)
    p = run_eval("mrr", "--ckpt", str(out), "--data", str(train_dir), "--images", "3", "--candidates", "4",
                 "--out", str(tmp_path / "m.json"))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    p = eval_in_process("linear", "--ckpt", str(out), "--data", str(train_dir), "--val", str(val_dir), "--epochs", "5",
                 "--out", str(tmp_path / "l.json"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "l.json").read_text())["classes"] == 2
    # the .txt file is ignored and the corrupt .jpg skipped, both counted in the report
    assert "1 non-image files ignored" in p.stdout and "1 decode failures substituted" in p.stdout, p.stdout
    # a wrong path, an empty folder, a wrong checkpoint: one clear line, exit 2, no traceback
    (tmp_path / "empty").mkdir()
    (tmp_path / "bogus.pt").write_bytes(b"garbage")
    for args, needle in [(["mrr", "--ckpt", str(out), "--data", str(tmp_path / "missing")], "does not exist"),
                         (["mrr", "--ckpt", str(out), "--data", str(tmp_path / "empty")], "no images"),
                         (["mrr", "--ckpt", str(tmp_path / "nope.pt")], "does not exist"),
                         (["mrr", "--ckpt", str(tmp_path / "bogus.pt")], "cannot read checkpoint")]:
        p = eval_in_process(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert needle in p.stderr.lower() and "Traceback" not in p.stderr, p.stderr


@pytest.mark.slow
def test_resume_restores_weights_and_target_encoder(trained_run, tmp_path):
    """Resuming at the step it stopped (nothing left to train) must reproduce the saved weights exactly:
    the online networks from DeepSpeed's state, the target encoder from the client state."""
    from engine.pretrain import pretrain

    out, _ = trained_run
    before = torch.load(out / "checkpoint.pt", weights_only=False)
    copy = tmp_path / "same"
    shutil.copytree(out, copy)
    (copy / "checkpoint.pt").unlink()  # must be rebuilt from ds/, not copied through
    result = pretrain(tiny_config(copy, 40))
    after = torch.load(copy / "checkpoint.pt", weights_only=False)
    assert result.step == 40
    for part in ("encoder", "predictor", "target_encoder"):
        assert before[part].keys() == after[part].keys()
        for k in before[part]:
            assert torch.equal(before[part][k], after[part][k]), (part, k)


@pytest.mark.slow
def test_fresh_start_moves_the_old_run_aside(trained_run, tmp_path):
    from engine.checkpoint import RunDir
    from engine.pretrain import pretrain

    out, _ = trained_run
    copy = tmp_path / "fresh"
    shutil.copytree(out, copy)
    old_weights = (copy / "checkpoint.pt").read_bytes()
    cfg = tiny_config(copy, 4)
    cfg.train.resume = False
    pretrain(cfg)
    assert RunDir(str(copy)).tags() == ["step_00000004"]
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 4
    previous = list((copy / "previous").iterdir())
    assert len(previous) == 1, "the old run is kept, not deleted"
    assert (previous[0] / "checkpoint.pt").read_bytes() == old_weights
    assert (previous[0] / "ds" / "step_00000040").is_dir()
