"""benchmarks/full_size.py's pure parts (the real-size steps take minutes and GiBs: run the script itself) and the
plan's CPU-resident variant it compares against."""
import glob
import json
import os

import pytest

from benchmarks import full_size, recipe_step
from engine.plan import GiB, PRECISIONS, REDUCE_BUCKET_SIZE, memory_plan, param_counts, token_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_pretraining_recipe_runs_at_224_px_with_its_real_networks():
    recipes = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "recipes", "pretrain_vit*.py"))}
    assert {launch[0] for launch in full_size.LAUNCHES.values()} == recipes
    for name, (recipe, ranks, stage, batch) in full_size.LAUNCHES.items():
        cfg = recipe_step.load_config(recipe, full_size.sets(name, "unused"))
        real = recipe_step.load_config(recipe)
        assert cfg.data.img_size == 224 and cfg.model.encoder_dims() == real.model.encoder_dims()
        assert (cfg.model.predictor_depth, cfg.model.predictor_width) == (real.model.predictor_depth,
                                                                           real.model.predictor_width)
        assert cfg.train.zero_stage == stage and cfg.data.batch_size == batch <= 2 and ranks in (1, 2)
        assert cfg.optim.global_batch is None  # one optimizer step = one micro-batch per rank


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resident_plan_counts_only_the_written_part_of_the_reduce_bucket(stage):
    cfg = recipe_step.load_config("recipes/pretrain_vitb_inv.py", full_size.sets("vitb_inv", "unused"))
    P = param_counts(cfg)["trainable"]
    tok = token_stats(cfg, 2)
    gpu = memory_plan(cfg, stage, 2, PRECISIONS["fp32"], False, tok, "padded", 0.0)
    cpu = memory_plan(cfg, stage, 2, PRECISIONS["fp32"], False, tok, "padded", 0.0, resident=True)
    assert gpu.buffers == REDUCE_BUCKET_SIZE * 4  # the fp32 bucket, all of it allocated on a GPU
    assert cpu.buffers == min(REDUCE_BUCKET_SIZE, P) * 4 < gpu.buffers
    assert gpu.total - cpu.total == pytest.approx(gpu.buffers - cpu.buffers)
    assert cpu.buffers / GiB == pytest.approx(P * 4 / GiB)  # ViT-B + 12 x 384: P < 5e8


def measured_steps(row: dict) -> list:
    """The launch's measured peak per step (GiB, the larger rank); a one-step result's single peak is its first."""
    ranks = row["ranks_measured"]
    if "peaks" in ranks[0]:
        return [max(r["peaks"][i] - r["baseline"] for r in ranks) / GiB for i in range(len(ranks[0]["peaks"]))]
    return [max(r["peak"] - r["baseline"] for r in ranks) / GiB]


def stored_rows() -> list:
    """Each launch's measurement in benchmarks/results/full_size*.json; a launch in several files: the last by name
    (full_size_vitb_zero3.json remeasured the ViT-B/16 launches of full_size_vitb_equi_vith.json)."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "full_size*.json"))):
        with open(path) as f:
            rows.update({r["name"]: r for r in json.load(f)["rows"] if r.get("ok")})
    return list(rows.values())


@pytest.mark.parametrize("row", stored_rows(), ids=lambda r: r["name"])
def test_plan_is_within_15_percent_of_each_measured_step(row):
    """engine.plan now against the stored full-size measurements: the first step against first_step_total, the
    second (steady state) against total."""
    plan = full_size.plan_bytes(row["name"])
    for measured, planned in zip(measured_steps(row), plan["steps"]):
        assert abs(planned / GiB / measured - 1) <= full_size.TOLERANCE, (row["name"], planned / GiB, measured)
