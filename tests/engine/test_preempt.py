"""Stopping on purpose and on failure, in one process: the signal flag and the agreed stop
(engine/preempt.py), srun's variables (engine/distributed.py), the heartbeat verdicts (engine/watchdog.py),
and a second signal during the save. The 2-rank runs are in tests/engine/test_preempt_ranks.py."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from engine import preempt
from engine.distributed import LaunchError, launch_environment, slurm_environment
from engine.watchdog import DONE, FAILED, Watchdog
from tests.helpers import ROOT, read_metrics, subprocess_env, tiny_config


# ---- the signal flag --------------------------------------------------------------------------------
def test_signals_set_a_flag_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with preempt.StopSignals() as sig:
        assert sig.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert sig.received == signal.SIGUSR1 and sig.count == 2  # the first one is the one reported
    assert signal.getsignal(signal.SIGUSR1) is before


def poll(vote):
    decision = vote.decide()
    vote.post()
    return decision


def test_one_process_vote_stops_at_the_next_boundary(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(preempt.time, "monotonic", lambda: clock[0])
    with preempt.StopSignals() as sig:
        vote = preempt.StopVote(sig, every_minutes=1.0)
        assert poll(vote) is None
        clock[0] += 61  # a minute of wall clock since the start
        assert vote.decide() == "time"
        vote.saved()  # the save restarts the interval before the flags go out
        vote.post()
        assert poll(vote) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert poll(vote) == "signal"
        vote.close()
    assert vote.polls == 4 and vote.seconds >= 0


def test_no_wall_clock_checkpoint_when_off(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(preempt.time, "monotonic", lambda: clock[0])
    vote = preempt.StopVote(preempt.StopSignals(), every_minutes=0.0)
    clock[0] += 10 ** 6
    assert poll(vote) is None


def test_loader_workers_outlive_the_stop_signals_their_tree_gets():
    """The DeepSpeed launcher SIGTERMs each rank's whole process tree; SLURM signals every process of a step.
    A worker must not die of it (its rank is busy stopping at an agreed step and needs its next batch)."""
    from torch.utils.data import TensorDataset

    from engine.data import build_loader

    data = TensorDataset(torch.arange(64.0).reshape(64, 1), torch.zeros(64))
    loader = build_loader(data, batch_size=4, num_workers=1, shuffle=False, drop_last=True, seed=0)
    batches = iter(loader)
    first = next(batches)[0]
    for s in preempt.STOP_SIGNALS:  # from another process, as a launcher's or SLURM's: a plain torch worker dies
        subprocess.run(["kill", f"-{signal.Signals(s).name[3:]}", str(batches._workers[0].pid)], check=True)
    rest = [b[0] for b in batches]
    assert torch.equal(torch.cat([first, *rest]).flatten(), torch.arange(64.0))
    worker = batches._workers[0]
    batches._shutdown_workers()  # the end of the epoch's iterator: the worker exits on the loader's sentinel
    worker.join(timeout=10)
    assert worker.exitcode == 0


@pytest.mark.parametrize("forget", [False, True], ids=["its-iterator-alive", "its-iterator-unknown"])
def test_a_rank_with_live_loader_workers_exits(forget):
    """The workers ignore SIGTERM, and multiprocessing's exit SIGTERMs its daemon children and then joins them:
    without the loader's own exit hook the rank would wait for ever at its exit; also for a worker whose
    iterator the hook does not hold (collected while its worker was still busy)."""
    script = ("import torch\nfrom torch.utils.data import TensorDataset\nimport engine.data\n"
              "data = TensorDataset(torch.arange(64.0).reshape(64, 1), torch.zeros(64))\n"
              "batches = iter(engine.data.build_loader(data, 4, num_workers=1, shuffle=False, drop_last=True, "
              "seed=0))\nnext(batches)\n" + ("engine.data._WORKER_BATCHES.clear()\n" if forget else "") +
              "print('mid-epoch', flush=True)\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "mid-epoch" in p.stdout, p.stderr[-2000:]


# ---- srun without a launcher ------------------------------------------------------------------------
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NODELIST": "gpu[003-004,007]",
        "SLURM_JOB_ID": "123456"}


def test_slurm_variables_give_the_rendezvous():
    env = slurm_environment(SRUN)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "5"
    assert env["MASTER_ADDR"] == "gpu003"  # the first host of the expanded list
    other = slurm_environment(dict(SRUN, SLURM_PROCID="12", SLURM_LOCALID="4"))
    assert other["MASTER_PORT"] == env["MASTER_PORT"] and 20000 <= int(env["MASTER_PORT"]) < 60000
    assert slurm_environment(dict(SRUN, SLURM_NODELIST="", SLURM_JOB_NODELIST="a1,a2"))["MASTER_ADDR"] == "a1"
    assert slurm_environment(dict(SRUN, MASTER_ADDR="h", MASTER_PORT="1234"))["MASTER_PORT"] == "1234"


def test_a_launcher_wins_and_plain_python_is_one_rank():
    assert launch_environment(dict(SRUN, RANK="3")) == {}  # deepspeed / torchrun under srun
    one = launch_environment({})
    assert (one["RANK"], one["WORLD_SIZE"], one["LOCAL_RANK"]) == ("0", "1", "0")


@pytest.mark.parametrize("missing", ["SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST"])
def test_a_missing_slurm_variable_is_named(missing):
    env = {k: v for k, v in SRUN.items() if k != missing}
    with pytest.raises(LaunchError, match=f"but {missing} is not"):
        launch_environment(env)


def test_a_bad_slurm_value_is_one_line():
    with pytest.raises(LaunchError, match="SLURM_NTASKS='sixteen'"):
        slurm_environment(dict(SRUN, SLURM_NTASKS="sixteen"))


def test_setup_distributed_error_is_exit_code_2(capsys, monkeypatch):
    from engine.cli import exit_code_of
    from engine.distributed import setup_distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert exit_code_of(setup_distributed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SLURM_NTASKS" in err[0]


def test_the_requeued_job_continues_its_own_run():
    from engine.submit import RecipeJob, resume_args

    args = ["--out", "runs/x", "--fresh", "--init", "w.pt", "--set", "train.seed=1", "--init=v.pt"]
    assert resume_args(args) == ["--out", "runs/x", "--set", "train.seed=1"]
    again = RecipeJob("recipes/pretrain_tiny.py", args).checkpoint()
    assert again.function.args == ["--out", "runs/x", "--set", "train.seed=1"]
    assert again.function.recipe.endswith("recipes/pretrain_tiny.py")


def test_submit_command_line(capsys):
    from engine.submit import main

    assert main(["recipes/missing.py", "--local", "--", "--steps", "2"]) == 2
    assert "recipes/missing.py" in capsys.readouterr().err


# ---- heartbeat verdicts -----------------------------------------------------------------------------
def beat(folder, rank, text):
    os.makedirs(folder / ".heartbeat", exist_ok=True)
    (folder / ".heartbeat" / f"rank_{rank:05d}").write_text(text + "\n")


def watchdog(tmp_path, world=3, timeout=10.0):
    dog = Watchdog(str(tmp_path), 0, world, timeout, lambda: "resume note")
    dog._seen = {r: ("", 0.0) for r in range(1, world)}
    dog._moved = {r: (0, 0.0) for r in range(world)}
    return dog


def test_a_stopped_heartbeat_is_named_after_the_timeout(tmp_path):
    dog = watchdog(tmp_path)
    beat(tmp_path, 1, "1 4 2 hostA 11")
    beat(tmp_path, 2, "1 4 2 hostB 22")
    assert dog.check(1.0) is None
    beat(tmp_path, 1, "2 4 2 hostA 11")  # rank 1 beats on, rank 2 does not
    assert dog.check(9.0) is None
    beat(tmp_path, 1, "3 4 2 hostA 11")
    rank, why = dog.check(11.5)
    assert rank == 2 and "no heartbeat for 10.5 s" in why and "host hostB, PID 22, last finished step 2" in why


def test_a_rank_stuck_behind_is_named_and_a_level_stall_is_not(tmp_path):
    first = watchdog(tmp_path, world=2)
    first.started_step(1)  # this rank is in step 1; rank 1 has not finished its first step: not judged yet
    for t in range(0, 30, 2):
        beat(tmp_path, 1, f"{t} 1 0 hostA 11")
        assert first.check(float(t)) is None
    dog = watchdog(tmp_path, world=2)
    dog.started_step(3)  # this rank holds step 3's batches (progress 7); rank 1 has finished step 2 only
    for t in range(0, 30, 2):
        beat(tmp_path, 1, f"{t} 4 2 hostA 11")  # alive (the beat changes), progress 4: still loading step 2
        verdict = dog.check(float(t))
        if t <= 10:
            assert verdict is None
    assert verdict is not None and verdict[0] == 1 and "no progress" in verdict[1]
    level = watchdog(tmp_path, world=2)
    level.started_step(2)  # progress 5 = rank 1's: both inside step 2 (e.g. one computing, one waiting)
    for t in range(0, 30, 2):
        beat(tmp_path, 1, f"{t} 5 2 hostA 11")
        assert level.check(float(t)) is None


def test_a_rank_that_finished_is_not_silent_and_one_that_failed_is_named_at_once(tmp_path):
    dog = watchdog(tmp_path, world=2)
    beat(tmp_path, 1, DONE)
    assert dog.check(100.0) is None
    beat(tmp_path, 1, FAILED)
    assert dog.check(0.0) == (1, "its own code raised an error (the traceback is in its log)")


def test_the_watchdog_thread_ends_the_process_with_one_line(tmp_path):
    """In a child process (the thread calls os._exit): a peer that never beats is named within the bound."""
    import subprocess
    import sys
    import time

    code = ("import time; from engine.watchdog import Watchdog; "
            f"d = Watchdog({str(tmp_path)!r}, 0, 2, 1.0, lambda: 'resume note').start(); time.sleep(30)")
    started = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    took = time.time() - started
    assert p.returncode == preempt.EXIT_PEER_LOST, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 went silent: no heartbeat") and \
        "resume note" in lines[0], p.stderr
    assert took < 1.0 + 0.1 + 10, took  # the bound (timeout + one beat), with the interpreter's start-up


# ---- a signal in one process: the save completes, a second signal does not corrupt it -----------------
@pytest.mark.slow
def test_second_signal_during_the_save_and_an_exact_rerun(tmp_path, monkeypatch):
    from engine import checkpoint as ckpt_lib
    from engine.run import Run
    from engine.pretrain import pretrain as train

    ref = train(tiny_config(tmp_path / "ref", 8, ["train.log_every=1", "train.ckpt_every=100"]))
    ref_losses = [r["loss"] for r in read_metrics(ref.out_dir) if r.get("loss")]

    original_step, original_save = Run.optimizer_step, ckpt_lib.RunDir.save
    saves = []

    def step_then_signal(self, engine, task, step, *a, **k):
        out = original_step(self, engine, task, step, *a, **k)
        if step == 2:  # during optimizer step 3 (0-based 2): the first signal
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    def save_with_a_second_signal(self, engine, step, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered inside the save
        os.kill(os.getpid(), signal.SIGUSR1)
        saves.append(step)
        return original_save(self, engine, step, **k)

    monkeypatch.setattr(Run, "optimizer_step", step_then_signal)
    monkeypatch.setattr(ckpt_lib.RunDir, "save", save_with_a_second_signal)
    out = tmp_path / "stopped"
    cfg = tiny_config(out, 8, ["train.log_every=1", "train.ckpt_every=100"])
    with pytest.raises(preempt.Preempted, match="stopped by SIGTERM after step 3") as stop:
        train(cfg)
    assert stop.value.step == 3 and saves == [3]
    run_dir = ckpt_lib.RunDir(str(out))
    assert run_dir.resume_tag() == ("step_00000003", None) and run_dir.check_tag("step_00000003") is None
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(Run, "optimizer_step", original_step)
    monkeypatch.setattr(ckpt_lib.RunDir, "save", original_save)
    train(tiny_config(out, 8, ["train.log_every=1", "train.ckpt_every=100"]))
    assert [r["loss"] for r in read_metrics(out) if r.get("loss")] == ref_losses  # bit for bit (CSV text)
