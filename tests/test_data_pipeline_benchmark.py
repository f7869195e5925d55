"""benchmarks/data_pipeline.py --part loader: both sources at every worker count, and the workers per GPU
are the plan's images per second per GPU over the measured rate per core, rounded up."""
import json
import math
import os

import pytest

from engine.config import load_recipe
from engine.plan import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_loader_benchmark_rows_and_workers_per_gpu(tmp_path):
    from benchmarks import data_pipeline

    out = tmp_path / "dp.json"
    data_pipeline.run(quick=True, out=str(out), part="loader", workers=(1,), images=32)
    result = json.loads(out.read_text())
    assert [(r["source"], r["workers"]) for r in result["loader"]] == [
        ("imagefolder", 0), ("imagefolder", 1), ("shards", 0), ("shards", 1)]
    assert all(r["images"] == 32 and r["img_per_s_per_core"] > 0 for r in result["loader"])
    per_core = {r["source"]: r["img_per_s_per_core"] for r in result["loader"] if r["workers"] == 1}
    for row, (name, gpus) in zip(result["workers_per_gpu"], [("pretrain_vitb_equi", 8), ("pretrain_vith", 16)]):
        p = plan(load_recipe(os.path.join(ROOT, "recipes", f"{name}.py")), gpus)
        stage1 = next(r for r in p["rows"] if r["zero_stage"] == 1 and not r["activation_checkpointing"])
        need = stage1["time"]["images_per_s"] / gpus
        assert row["recipe"] == name and row["gpus"] == gpus
        assert row["workers_imagefolder"] == math.ceil(need / per_core["imagefolder"])
        assert row["workers_shards"] == math.ceil(need / per_core["shards"])
