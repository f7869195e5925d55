"""Submit a recipe to SLURM with submitit (as Meta's I-JEPA / V-JEPA repositories do): one task per GPU,
and when the job is preempted or reaches its time limit it saves and is requeued, then resumes.

    python -m engine.submit recipes/pretrain_vith.py --nodes 2 --gpus-per-node 8 --partition learn \\
        --time 4320 -- --data /datasets/imagenet/train

The path of a preemption: SLURM sends submitit's signal (SIGUSR2, ``--signal=USR2@<signal-delay>``) to every
task; the run core (``engine/run.py``) stops every rank at the same step and writes a complete checkpoint
(``engine/preempt.py``); the recipe exits with code 75; :class:`RecipeJob` then hands the signal to
submitit's own handler, which calls :meth:`RecipeJob.checkpoint` on rank 0 and requeues the job
(``scontrol requeue``; the local executor restarts its tasks); the requeued job runs the same command,
which resumes from the newest complete checkpoint. Everything submitit does (the requeue, the count of
time-outs, the logs under ``--folder``) is submitit's; this file only says what a task runs.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from typing import List, Optional

from engine.preempt import EXIT_PREEMPTED


class RecipeJob:
    """What every submitit task runs: the recipe file as ``python RECIPE ARGS`` would, as one rank."""

    def __init__(self, recipe: str, args: List[str]):
        self.recipe, self.args = os.path.abspath(recipe), list(args)

    def __call__(self) -> int:
        import submitit

        # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the job (the first node hosts the
        # rendezvous; the port is drawn from the job id); every task keeps seeing all of its node's GPUs
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        code = run_recipe_file(self.recipe, self.args)
        if code == EXIT_PREEMPTED:  # saved at the signal: let submitit requeue the job (rank 0 does it)
            usr_sig = submitit.JobEnvironment._usr_sig()
            if callable(signal.getsignal(usr_sig)):
                signal.raise_signal(usr_sig)  # submitit's handler: checkpoint() + requeue + exit, on rank 0
        return code

    def checkpoint(self) -> "object":
        """Called by submitit on rank 0 at the preemption signal: the same command again, which resumes from
        the run directory's newest complete checkpoint (:func:`resume_args`)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RecipeJob(self.recipe, resume_args(self.args)))


def resume_args(args: List[str]) -> List[str]:
    """A recipe's flags for the requeued job: without ``--fresh`` (it would set the run aside) and ``--init``
    (a warm start is refused into a folder that holds a run): the rerun continues its own checkpoint."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--init":
            skip = True
        elif a != "--fresh" and not a.startswith("--init="):
            out.append(a)
    return out


def run_recipe_file(recipe: str, args: List[str]) -> int:
    """Run ``recipe`` as ``__main__`` with ``args`` as its command line; its exit code."""
    argv = sys.argv
    sys.argv = [recipe, *args]
    try:
        runpy.run_path(recipe, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def executor(folder: str, *, nodes: int, gpus_per_node: int, time_min: int, partition: Optional[str] = None,
             account: Optional[str] = None, cpus_per_task: int = 10, signal_delay_s: int = 180, local: bool = False,
             name: str = "iwm"):
    """A submitit executor: SLURM (or the local executor, ``local=True``, one node) with one task per GPU and
    submitit's preemption signal ``signal_delay_s`` before the time limit."""
    import submitit

    if local:
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=gpus_per_node, gpus_per_node=0 if not _has_cuda() else gpus_per_node,
                             timeout_min=time_min, signal_delay_s=signal_delay_s)
        return ex
    ex = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=30)
    extra = {"slurm_partition": partition} if partition else {}
    if account:
        extra["slurm_account"] = account
    ex.update_parameters(name=name, nodes=nodes, tasks_per_node=gpus_per_node, gpus_per_node=gpus_per_node,
                         cpus_per_task=cpus_per_task, timeout_min=time_min, slurm_signal_delay_s=signal_delay_s,
                         **extra)
    return ex


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[List[str]] = None) -> int:
    from engine.cli import submit_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, recipe_args = submit_parser().parse_args(argv[:cut]), argv[cut + 1:]
    if not os.path.isfile(args.recipe):
        print(f"error: recipe {args.recipe!r} does not exist: pass a file under recipes/", file=sys.stderr)
        return 2
    ex = executor(args.folder, nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_min=args.time,
                  partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
                  signal_delay_s=args.signal_delay, local=args.local,
                  name=os.path.splitext(os.path.basename(args.recipe))[0])
    job = ex.submit(RecipeJob(args.recipe, recipe_args))
    print(f"submitted job {job.job_id}: logs in {args.folder}; it requeues itself when preempted or at its time "
          f"limit and resumes from its newest complete checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
