"""Two CPU ranks stopped on purpose and on failure, under the DeepSpeed launcher and under srun's variables
set by hand (no launcher):

- SIGUSR1 to one rank at a random moment (and submitit's SIGUSR2 to its two tasks): every rank stops at the
  same step, writes a complete tag, exits with code 75, and the rerun (the requeued job) continues from that
  step with the uninterrupted run's losses and weights, bit for bit;
- the wall-clock interval that only one rank's clock calls: both save at the same steps;
- a rank stopped with SIGSTOP (alive, connected, silent), with and without the launcher, or one that
  raises: the other stops within the watchdog's bound, naming it in one line, exit code 76; the rerun
  resumes from the tag the line names, bit for bit.

``tests/stress_preempt.py`` runs the signal trial at 10 random moments (half of them SIGTERM to the
launcher, which SIGTERMs every rank and its loader workers)."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from engine.distributed import free_port, remove_shm_buffers
from engine.preempt import EXIT_PEER_LOST, EXIT_PREEMPTED
from tests.engine.test_resume_exact import losses, logged_steps, weights
from tests.helpers import ROOT, TINY, deepspeed_launcher, shm_buffers, subprocess_env

STEPS = 10
WATCHDOG = 8.0  # train.watchdog_seconds in these runs; a beat every 0.8 s
SETS = ["train.ckpt_every=2", "train.log_every=1", "train.eval_every=0", f"train.watchdog_seconds={WATCHDOG}"]


def recipe_args(out, workers, extra=()):
    sets = [a for t in TINY + [f"data.num_workers={workers}"] + SETS + list(extra) for a in ("--set", t)]
    return ["recipes/pretrain_tiny.py", "--out", str(out), "--steps", str(STEPS), *sets]


class Launch:
    """One 2-rank run: the DeepSpeed launcher (``launcher=True``) or two processes given srun's variables."""

    def __init__(self, out, launcher: bool, workers: int = 0, pythonpath: str = "", extra=()):
        self.out, self.launcher, self.port = out, launcher, free_port()  # other test runs share the host
        self.log = f"{out}.{self.port}.log"
        env = subprocess_env()
        if pythonpath:
            env["PYTHONPATH"] = f"{pythonpath}:{env['PYTHONPATH']}"
        self.files = []
        if launcher:
            cmd = [deepspeed_launcher(), "--num_gpus", "2", "--master_port",
                   str(self.port), *recipe_args(out, workers, extra)]
            self.procs = [self._start(cmd, env, self.log)]
        else:
            self.procs = []
            for r in range(2):
                srun = dict(env, SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODELIST="localhost",
                            SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port))
                self.procs.append(self._start([sys.executable, *recipe_args(out, workers, extra)], srun, f"{self.log}.{r}"))

    def _start(self, cmd, env, log):
        f = open(log, "w")
        self.files.append(f)
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def rank_pids(self):
        """The two rank processes (under the launcher: the recipe processes it started, not their loader
        workers)."""
        if not self.launcher:
            return [p.pid for p in self.procs]
        found = self._find(lambda cmd, parent: "--local_rank=" in cmd and "--local_rank=" not in parent, 2)
        return [p.pid for p in sorted(found, key=lambda p: " ".join(p.cmdline()))]

    def launcher_pid(self):
        """The node's launcher (``deepspeed.launcher.launch``: it handles SIGTERM; the ``deepspeed`` runner above
        it does not)."""
        return self._find(lambda cmd, parent: "deepspeed.launcher.launch" in cmd, 1)[0].pid

    def _find(self, match, count):
        import psutil

        deadline = time.time() + 60
        while time.time() < deadline:
            found = []
            for p in psutil.Process(self.procs[0].pid).children(recursive=True):
                try:
                    if match(" ".join(p.cmdline()), " ".join(p.parent().cmdline())):
                        found.append(p)
                except psutil.Error:
                    continue
            if len(found) == count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"the launcher did not start {count} such processes")

    def wait_logged(self, step, timeout=300):
        deadline = time.time() + timeout
        while logged_steps(self.out) < step and time.time() < deadline:
            assert all(p.poll() is None for p in self.procs), self.output()
            time.sleep(0.01)
        assert logged_steps(self.out) >= step, self.output()

    def wait(self, timeout=300):
        try:
            codes = [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()  # never leave ranks behind
            raise
        for f in self.files:
            f.close()
        return codes

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()
        remove_shm_buffers(self.port)  # killed ranks cannot remove their 66 MB DeepSpeed buffers

    def output(self, rank=None):
        path = self.log if self.launcher else f"{self.log}.{rank or 0}"
        with open(path) as f:
            return f.read()


def run_to_end(out, launcher=True, workers=0):
    launch = Launch(out, launcher, workers)
    codes = launch.wait()
    assert codes == [0] * len(codes), [launch.output(r) for r in range(len(codes))][-1][-3000:]
    return launch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt") / "ref"
    run_to_end(out, launcher=True, workers=1)
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    return losses(out), weights(out)


def assert_same_run(out, reference):
    ref_losses, ref_weights = reference
    assert losses(out) == ref_losses, "losses differ from the uninterrupted run"
    got = weights(out)
    assert got.keys() == ref_weights.keys() and all((got[k] == ref_weights[k]).all() for k in got)


def signal_trial(tmp_path, reference, rng, trial, target):
    """A signal at a random moment (``target``: "rank" sends SIGUSR1 to a random rank, "launcher" SIGTERM to
    the launcher); returns the step the run stopped at. Asserts the stop, the tag and the exact rerun."""
    out = tmp_path / f"signalled_{trial}"
    launch = Launch(out, launcher=True, workers=1)
    after = rng.randint(2, STEPS - 3)
    launch.wait_logged(after)
    time.sleep(rng.random() * 0.3)
    if target == "rank":
        os.kill(rng.choice(launch.rank_pids()), signal.SIGUSR1)
    else:
        os.kill(launch.launcher_pid(), signal.SIGTERM)
    code, = launch.wait()
    text = launch.output()
    found = re.findall(r"stopped by (.+?) after step (\d+) \(every rank at that step\): checkpoint (\S+) is complete",
                       text)
    assert len(found) == 1, text[-3000:]  # one line, from the main rank
    stopped = int(found[0][1])
    assert code == (EXIT_PREEMPTED if target == "rank" else 1), text[-2000:]  # the launcher's own SIGTERM exit is 1
    assert after <= stopped < STEPS and max(losses(out)) == stopped
    assert found[0][2].endswith(f"step_{stopped:08d}") and os.path.isfile(os.path.join(found[0][2], "manifest.json"))
    rerun = run_to_end(out, launcher=True, workers=1)
    assert f"resumed from step_{stopped:08d} at step {stopped}" in rerun.output()
    assert_same_run(out, reference)
    assert not shm_buffers(launch.port) and not shm_buffers(rerun.port)
    return stopped


@pytest.mark.slow
def test_a_signal_to_one_rank_at_a_random_moment_continues_bit_exact(tmp_path, reference):
    """SIGUSR1 to one random rank: both stop at the same step. (The submitit test below is a second random
    moment, SIGUSR2 to every rank; tests/stress_preempt.py tries 10, half of them SIGTERM to the launcher.)"""
    signal_trial(tmp_path, reference, random.Random(18), 0, "rank")


def silent_rank_1(launch, how):
    """Make rank 1 go silent after step 4 has been logged; returns when it went silent."""
    launch.wait_logged(4)
    if how == "stop":
        os.kill(launch.rank_pids()[1], signal.SIGSTOP)
        return time.time()
    launch.procs[1].wait(timeout=120)  # "raise": it raised at step 5 (the injected failure) and exited
    return time.time()


def rank_0_stops_naming_rank_1(launch, went_silent):
    """Rank 0 exits with 76 within the watchdog's bound of rank 1 going silent, and says so in one line."""
    import psutil

    if launch.launcher:
        try:
            code = psutil.Process(launch.rank_pids()[0]).wait(timeout=WATCHDOG + 60)  # the launcher's child
        except psutil.NoSuchProcess:
            code = None  # already gone and reaped by the launcher
    else:
        code = launch.procs[0].wait(timeout=WATCHDOG + 60)
    took = time.time() - went_silent
    text = launch.output(0)
    lines = [ln for ln in text.splitlines() if "went silent" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 went silent:"), text[-3000:]
    assert "rerun the same command to resume from the last complete checkpoint, step" in lines[0]
    assert code in (EXIT_PEER_LOST, None), (code, text[-2000:])
    # the bound: the timeout plus one beat, with room for a loaded 2-core machine
    assert took < WATCHDOG * 1.1 + 5, took
    print(f"rank 0 stopped {took:.1f} s after rank 1 went silent (train.watchdog_seconds={WATCHDOG})")
    return int(re.search(r"last complete checkpoint, step (\d+) in", lines[0]).group(1))


@pytest.mark.slow
def test_a_stopped_rank_without_a_launcher_is_named_and_the_rerun_is_exact(tmp_path, reference):
    out = tmp_path / "stopped"
    launch = Launch(out, launcher=False)
    went_silent = silent_rank_1(launch, "stop")
    last = rank_0_stops_naming_rank_1(launch, went_silent)
    launch.kill()  # what srun --kill-on-bad-exit does to the stopped rank
    rerun = run_to_end(out, launcher=False)
    assert f"resumed from step_{last:08d} at step {last}" in rerun.output(0)  # the one the line named
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_stopped_rank_under_the_launcher_is_named(tmp_path):
    launch = Launch(tmp_path / "stopped", launcher=True)
    went_silent = silent_rank_1(launch, "stop")
    rank_0_stops_naming_rank_1(launch, went_silent)
    launch.kill()  # the launcher would SIGKILL the stopped rank 30 s after its SIGTERM
    assert launch.procs[0].returncode in (EXIT_PEER_LOST, -signal.SIGKILL)


RANK_1_FAST_CLOCK_THEN_RAISE = '''
import os
if os.environ.get("SLURM_PROCID") == "1":
    import time
    import engine.preempt as preempt
    import engine.run as run
    real = time.monotonic
    class Clock:  # rank 1's wall clock runs 600x fast: its train.ckpt_every_minutes=0.1 is due every 0.01 s
        def __getattr__(self, name):
            return getattr(time, name)
        def monotonic(self):
            return 600 * real()
    preempt.time = Clock()
    step_of = run.Run.optimizer_step
    def failing_step(self, engine, task, step, *a, **k):
        if step == 5:
            raise ValueError("injected failure on rank 1")
        return step_of(self, engine, task, step, *a, **k)
    run.Run.optimizer_step = failing_step
'''


@pytest.mark.slow
def test_wall_clock_saves_are_agreed_and_a_rank_that_raises_is_named(tmp_path):
    """No launcher. Rank 1's clock alone says a checkpoint is due (rank 0's 6 s never pass): both ranks save
    at the same steps, every such tag complete with both ranks' files. Then rank 1 raises in step 6: rank 0
    names it in one line, within the watchdog's bound, pointing at the last of those tags."""
    import json

    from engine.checkpoint import RunDir

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(RANK_1_FAST_CLOCK_THEN_RAISE)
    out = tmp_path / "raised"
    launch = Launch(out, launcher=False, pythonpath=str(inject),
                    extra=["train.ckpt_every=100", "train.ckpt_every_minutes=0.1", "train.keep_checkpoints=100"])
    went_silent = silent_rank_1(launch, "raise")
    assert "injected failure on rank 1" in launch.output(1) and launch.procs[1].returncode == 1
    last = rank_0_stops_naming_rank_1(launch, went_silent)
    launch.kill()
    saved = [int(s) for s in re.findall(r"wall-clock checkpoint at step (\d+)", launch.output(0))]
    # rank 1's flag, posted after one boundary's save (not due yet), is due at the next, read at the one after
    assert saved == [2, 4] and last == 4, launch.output(0)[-2000:]
    run_dir = RunDir(str(out))
    for step in saved:
        tag = f"step_{step:08d}"
        assert run_dir.check_tag(tag) is None
        with open(os.path.join(run_dir.ds_dir, tag, "manifest.json")) as f:
            assert {"rng_rank_00000.pt", "rng_rank_00001.pt"} <= set(json.load(f)["files"])


@pytest.mark.slow
def test_submitit_requeues_at_its_signal_and_resumes_exactly(tmp_path, reference, monkeypatch):
    """submitit's local executor, two tasks: its preemption signal (SIGUSR2, what SLURM sends through
    ``--signal``) at a random moment -> a save at one step on both ranks, submitit's requeue (rank 0 calls
    RecipeJob.checkpoint), the restarted tasks resume: the uninterrupted run's losses and weights."""
    import psutil

    from engine.submit import RecipeJob, executor

    for k, v in subprocess_env(MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)  # what the local controller hands its tasks
    out = tmp_path / "submitit_run"
    job = executor(str(tmp_path / "submitit"), nodes=1, gpus_per_node=2, time_min=30, local=True).submit(
        RecipeJob(os.path.join(ROOT, "recipes", "pretrain_tiny.py"), recipe_args(out, workers=1)[1:]))
    rng = random.Random(20)
    deadline = time.time() + 300
    while logged_steps(out) < rng.randint(2, STEPS - 3) and time.time() < deadline and not job.done():
        time.sleep(0.01)
    tasks = psutil.Process(job._process.pid).children()  # the controller's tasks (not their loader workers)
    assert len(tasks) == 2, job.stderr()
    for t in tasks:
        t.send_signal(signal.SIGUSR2)
    assert job.results() == [0, 0]  # both tasks of the requeued job: the recipe's exit code
    log = "".join((job.task(r).stdout() or "") + (job.task(r).stderr() or "") for r in range(2))
    stopped = re.findall(r"stopped by SIGUSR2 after step (\d+)", log)
    assert len(stopped) == 1 and "Requeued job" in log, log[-3000:]
    assert f"resumed from step_{int(stopped[0]):08d} at step {stopped[0]}" in log
    assert_same_run(out, reference)

