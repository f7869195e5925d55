"""benchmarks/scaling.py: its pure pieces against hand-computed values, and its quick sweep end to end (two
launches of the real `deepspeed` launcher) with every recorded figure re-derived from the runs' own files."""
import csv
import json
import os
import subprocess
import sys

import pytest

from benchmarks import scaling
from engine.config import IWMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_figures_discard_warmup_and_combine_steps_by_time():
    # 16 images per step: 4 img/s is the warm-up step; then 8 img/s (2 s) and 16 img/s (1 s)
    rows = [{"step": "1.0", "img_per_s": "4", "tflops_per_device": "0.1"},
            {"step": "2.0", "img_per_s": "8", "tflops_per_device": "0.2"},
            {"step": "3.0", "img_per_s": "16", "tflops_per_device": "0.4"},
            {"step": "3.0", "mrr": "0.1"}]  # a row without img_per_s (an eval row) is not a step
    f = scaling.step_figures(rows, warmup=1, images_per_step=16)
    assert f["measured_steps"] == 2
    assert f["img_per_s"] == pytest.approx(32 / 3)  # 32 images in 3 s, not the mean of 8 and 16
    assert f["step_s"] == pytest.approx(1.5) and f["step_s_median"] == pytest.approx(1.5)
    assert f["tflops_per_rank"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="--steps"):
        scaling.step_figures(rows, warmup=3, images_per_step=16)


def test_efficiency_and_speedup_against_the_fewest_ranks_of_the_same_size_and_stage():
    def pt(size, stage, world, thr):
        return {"size": size, "stage": stage, "world": world, "img_per_s": thr}

    pts = scaling.add_efficiency([pt("ti", 0, 1, 10.0), pt("ti", 0, 2, 15.0), pt("ti", 3, 2, 6.0),
                                  pt("ti", 3, 4, 9.0), pt("b", 0, 2, 4.0), pt("b", 0, 1, 3.0)])
    eff = {(p["size"], p["stage"], p["world"]): (p["efficiency"], p["speedup"]) for p in pts}
    assert eff[("ti", 0, 1)] == (pytest.approx(1.0), pytest.approx(1.0))
    assert eff[("ti", 0, 2)] == (pytest.approx(15 / 20), pytest.approx(1.5))
    assert eff[("ti", 3, 4)] == (pytest.approx(9 / 12), pytest.approx(1.5))  # base: 2 ranks at 6 img/s
    assert eff[("b", 0, 2)] == (pytest.approx(4 / 6), pytest.approx(4 / 3))  # base found whatever the order
    assert scaling.efficiency(30.0, 8, 10.0, 2) == pytest.approx(0.75)


def test_threads_are_fixed_per_rank_or_split_per_node():
    assert scaling.threads_per_rank(2, 1, None) == 1 and scaling.threads_per_rank(1, 3, None) == 3
    assert scaling.threads_per_rank(1, None, 2) == 2 and scaling.threads_per_rank(2, None, 2) == 1
    assert scaling.threads_per_rank(4, None, 2) == 1  # never zero threads


def test_child_env_drops_rank_variables_and_sets_threads():
    base = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "123", "MASTER_ADDR": "x",
            "PATH": "/bin", "OMP_NUM_THREADS": "8"}
    env = scaling.child_env(3, base)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"} & set(env)
    assert env["OMP_NUM_THREADS"] == "3" and env["PATH"] == "/bin" and env["OMP_WAIT_POLICY"] == "passive"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
    assert scaling.child_env(1, dict(base, OMP_WAIT_POLICY="active"))["OMP_WAIT_POLICY"] == "active"


def test_overrides_build_the_named_sizes():
    for size, (dim, depth, heads, pdepth, pwidth) in {"ti": (192, 12, 3, 6, 192), "b": (768, 12, 12, 6, 384),
                                                      "h": (1280, 32, 16, 12, 384)}.items():
        cfg = IWMConfig()
        point = scaling.Point(size, 2, 1, 2)
        img, patch = (224, 16) if size == "h" else (64, 8)
        for s in scaling.point_overrides(point, img, patch, batch=8, steps=4, workers=0):
            cfg.override(s)
        cfg.validate()
        assert cfg.model.encoder_dims() == (dim, depth, heads)
        assert (cfg.model.predictor_depth, cfg.model.predictor_width) == (pdepth, pwidth)
        assert cfg.model.patch_size == (14 if size == "h" else 8)  # ViT-H/14
        assert (cfg.train.zero_stage, cfg.optim.max_steps, cfg.train.log_every) == (2, 4, 1)
        assert cfg.data.embedded_per_class * cfg.data.embedded_classes >= 2 * 8 * point.world


def test_launch_command_spans_nodes_only_with_a_hostfile():
    one = scaling.launch_command("deepspeed", scaling.Point("s", 1, 1, 2), 29500, "/r", 1, ["a=1"])
    assert one[:5] == ["deepspeed", "--num_gpus", "2", "--master_port", "29500"] and "--hostfile" not in one
    assert one[-2:] == ["--set", "a=1"] and one[one.index("--threads") + 1] == "1"
    two = scaling.launch_command("deepspeed", scaling.Point("s", 1, 2, 8), 29500, "/r", 4, [], hostfile="hosts",
                                 master_addr="node1")
    assert two[two.index("--hostfile") + 1] == "hosts" and two[two.index("--num_nodes") + 1] == "2"
    assert two[two.index("--master_addr") + 1] == "node1" and two[two.index("--num_gpus") + 1] == "8"
    with pytest.raises(SystemExit, match="--hostfile"):
        scaling.launch_command("deepspeed", scaling.Point("s", 1, 2, 8), 29500, "/r", 4, [])


def test_table_rows_sorted_by_size_stage_ranks():
    def pt(size, stage, world):
        return dict(size=size, stage=stage, world=world, threads_per_rank=1, img_per_s=10.0 * world,
                    img_per_s_per_rank=10.0, step_s=0.8, peak_mem_mib=1000.0 + world, peak_above_start_mib=400.0,
                    memory_kind="peak_rss", speedup=1.0, efficiency=0.5)

    lines = scaling.table([pt("b", 0, 1), pt("ti", 3, 2), pt("ti", 0, 2), pt("ti", 0, 1)]).splitlines()
    assert [ln.split()[:3] for ln in lines[2:]] == [["ti", "0", "1"], ["ti", "0", "2"], ["ti", "3", "2"],
                                                     ["b", "0", "1"]]
    assert lines[3].split()[3:] == ["1", "20.00", "10.00", "0.800", "1002", "400", "1.00", "0.50"]


def test_bad_options_give_one_line_and_exit_2(capsys):
    assert scaling.main(["--steps", "2", "--warmup", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps 2 must exceed --warmup 2" in err[0]
    assert scaling.main(["--nodes", "2"]) == 2
    assert "--hostfile" in capsys.readouterr().err


def test_a_failed_point_is_retried_and_every_failure_kept(monkeypatch):
    calls = []

    def flaky(point, opts, work):
        calls.append(point.name)
        if len(calls) == 1:
            raise RuntimeError("exit -6: terminate called")
        return {"img_per_s": 1.0}

    monkeypatch.setattr(scaling, "run_point", flaky)
    opts, failed = type("Opts", (), {"retries": 1})(), []
    row = scaling.run_with_retries(scaling.Point("ti", 2, 1, 2), opts, "/nonexistent", failed, "[1/1]")
    assert row == {"img_per_s": 1.0, "attempts": 2} and len(calls) == 2
    assert failed == [{"point": "ti_z2_n1x2", "attempt": 1, "retried": True, "error": "exit -6: terminate called"}]
    monkeypatch.setattr(scaling, "run_point", lambda *a: (_ for _ in ()).throw(ValueError("no logged step")))
    failed = []
    assert scaling.run_with_retries(scaling.Point("ti", 2, 1, 2), opts, "/nonexistent", failed, "[1/1]") is None
    assert [(f["attempt"], f["retried"]) for f in failed] == [(1, True), (2, False)]


@pytest.mark.slow
def test_quick_sweep_end_to_end(tmp_path):
    out, work = tmp_path / "scaling.json", tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in scaling.LAUNCH_VARS}
    p = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--quick", "--out", str(out), "--work", str(work)],
                       cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert all(f["retried"] for f in result["failed"])  # a failure only counts when no retry succeeded
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = {q["world"]: q for q in result["points"]}
    assert sorted(points) == [1, 2] and all(q["size"] == "ti" and q["stage"] == 1 for q in points.values())
    for world, q in points.items():
        # throughput re-derived from the run's own metrics.csv: images of the steps after warm-up / their time
        with open(work / f"ti_z1_n1x{world}" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if float(r["step"]) > q["warmup"]]
        seconds = sum(8 * world / float(r["img_per_s"]) for r in rows)
        assert len(rows) == q["steps"] - q["warmup"] == 2
        assert q["img_per_s"] == pytest.approx(8 * world * len(rows) / seconds) and q["img_per_s"] > 0
        assert q["img_per_s_per_rank"] == pytest.approx(q["img_per_s"] / world)
        assert q["step_s"] == pytest.approx(8 * world / q["img_per_s"])
        assert q["threads_per_rank"] == 1 and len(q["peak_mem_per_rank_mib"]) == world
        assert all(m > s > 0 for m, s in zip(q["peak_mem_per_rank_mib"], q["rss_start_mib"]))
        assert q["peak_mem_mib"] == max(q["peak_mem_per_rank_mib"])
        if os.path.isdir("/dev/shm"):  # DeepSpeed's CPU all-reduce buffers of the launch are gone
            port = q["master_port"]
            assert not [n for n in os.listdir("/dev/shm") if n.endswith((f"_{port}_0", f"_{port}_1"))]
    assert points[2]["efficiency"] == pytest.approx(points[2]["img_per_s"] / (2 * points[1]["img_per_s"]))
    assert points[1]["efficiency"] == pytest.approx(1.0)
    assert "efficiency" in p.stdout and "1 per rank" in p.stdout


def test_remove_shm_buffers_deletes_only_that_launch(tmp_path):
    from engine.distributed import remove_shm_buffers

    uid = os.getuid()
    mine = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_5000_{r}" for r in (0, 1)]
    others = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_50001_0", f"deepspeed_allreduce_buffer_{uid + 1}_h_5000_0",
              f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_15000_0", "unrelated_5000_0"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    assert remove_shm_buffers("5000", str(tmp_path), rank=1) == [mine[1]]  # a rank's own, at its exit
    assert remove_shm_buffers(5000, str(tmp_path)) == [mine[0]]  # the launch's, after it
    assert sorted(os.listdir(tmp_path)) == sorted(others)
    assert remove_shm_buffers(5000, str(tmp_path / "missing")) == []
