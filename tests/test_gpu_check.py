"""benchmarks/gpu_check.py (`make gpu-check`): its dry mode end to end on this CPU machine, and the checks that
make a full run fail (a kernel off its reference, an op registered without check cases)."""
import json
import os
import sys
import types

import pytest
import torch

from benchmarks import gpu_check
from kernels import aot, dispatch
from kernels.specs import Shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = Shapes("tiny", batch=2, patches=9, enc_width=16, pred_width=16, action_dim=8, target_tokens=7,
              context_tokens=8, encoder_params=300, encoder_tensors=3)
needs_interpreter = pytest.mark.skipif(not (dispatch.triton_available() and dispatch.interpreter_enabled()),
                                       reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py)")


def test_max_error_is_relative_to_the_reference_magnitude():
    ref = [torch.tensor([4.0, -8.0]), torch.tensor([0.5])]
    fused = [torch.tensor([4.0, -8.2]), torch.tensor([0.5005])]
    abs_err, rel_err = gpu_check.max_error(fused, ref)
    assert abs_err == pytest.approx(0.2, rel=1e-5)
    assert rel_err == pytest.approx(0.025, rel=1e-4)  # the worse output: 0.2 / 8 (the other: 0.0005 / 0.5)
    assert gpu_check.max_error(fused[1:], ref[1:])[1] == pytest.approx(0.001, rel=1e-3)


@needs_interpreter
def test_every_registered_op_has_check_cases_that_pass_under_the_interpreter():
    for module in aot.op_modules():
        rows = gpu_check.module_rows(module, TINY, [torch.float32], torch.device("cpu"), None, None)
        assert rows and all(r["ok"] and "error" not in r for r in rows), rows


@needs_interpreter
def test_a_kernel_off_its_reference_fails(monkeypatch):
    import kernels.gather as gather

    real = gather.gather_tokens_reference
    monkeypatch.setattr(gather, "gather_tokens_reference", lambda x, idx: real(x, idx) * 1.001)
    (row,) = gpu_check.module_rows(gather, TINY, [torch.float32], torch.device("cpu"), None, None)
    assert not row["ok"] and row["max_rel_error"] == pytest.approx(1e-3, rel=0.05)


def test_an_op_without_check_cases_fails_and_says_why():
    (row,) = gpu_check.module_rows(types.ModuleType("kernels.new_op"), TINY, [torch.float32], torch.device("cpu"),
                                   None, None)
    assert not row["ok"] and "without check_cases" in row["error"]


@pytest.mark.slow
def test_dry_mode_runs_every_path_it_can_and_lists_what_it_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script turns the interpreter on itself when there is no CUDA
    from benchmarks import recipe_step

    # a process group of its own: a timeout stops the backend pairs' processes too
    proc = recipe_step.run_group([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out)], env,
                                 timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "dry" and result["ok"]
    ops = {r["op"] for r in result["kernels"]}
    assert {"gather_tokens", "masked_l2_loss", "feature_conditioning", "ema_update"} <= ops  # and any new op
    assert {r["recipe"] for r in result["kernels"]} == {"tiny (interpreter tiles)", "tiny (cuda tiles)"}
    assert all(r["ok"] and r["max_rel_error"] <= 1e-4 for r in result["kernels"])
    rows = {(r["kernels"], r["attention"], r["compile"]) for r in result["steps_rows"]}
    assert rows == {("triton", "sdpa", False), ("reference", "sdpa", False), ("triton", "sdpa", "eager")}
    for r in result["steps_rows"]:
        assert r["ok"] and r["img_per_s"] > 0 and r["plan_gib"] > 0
    # the backend pairs (and the compiled blocks) train the same network from the same seed on the same images:
    # the same loss (the compiled row has two more warm-up steps, so it is compared on its own terms only)
    losses = [r["loss"] for r in result["steps_rows"] if not r["compile"]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert any("bf16" in s for s in result["skipped"]) and any("xformers" in s for s in result["skipped"])
    assert "skipped (" in proc.stdout and "PASS" in proc.stdout
