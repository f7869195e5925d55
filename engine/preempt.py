"""Stopping a run on purpose: a preemption signal, or a wall-clock checkpoint interval, on any rank.

SLURM sends SIGUSR1 before a time limit (``sbatch --signal=USR1@180``) and SIGTERM when it preempts or
cancels a job; submitit's launcher uses SIGUSR2. :class:`StopSignals` turns each of them into a flag (a
signal never interrupts a step or a save: a second one during the save is logged and ignored).

Every rank must stop after the same optimizer step, whichever rank got the signal. :class:`StopVote` agrees
on it without a host sync in the step's hot path: at each step boundary a rank posts its flags (signal seen,
wall-clock checkpoint due) in a non-blocking all-reduce on a CPU (gloo) side group, and reads the result of
the previous boundary's all-reduce, which finished while the step ran. The tensors live on the host, so a
CUDA stream never waits; the cost is one tiny TCP all-reduce per step, overlapped with a whole step
(measured: ``benchmarks/preempt_vote.py``). Every rank reads the same sum at the same boundary, so all stop
after the same step: at most one step after the signal reached any rank, then the save.

Exit codes (``engine/cli.py`` returns them; docs/cluster.md):
    0   the run finished
    2   bad input (config, data, checkpoint), or the loss diverged
    75  stopped by a signal after saving a complete checkpoint: rerun the same command to continue
        (EX_TEMPFAIL: "try again later"; what ``sbatch --requeue`` and submitit do)
    76  another rank went silent (``engine/watchdog.py``); the last complete checkpoint is intact
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Dict, Optional

import torch

log = logging.getLogger("iwm")

EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

SIGNAL_BIT, TIME_BIT = 0, 1  # the two entries of the vote


class Preempted(Exception):
    """The run stopped at a signal after writing a complete checkpoint; the message says how to continue."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


class StopSignals:
    """While active (a context), SIGTERM / SIGUSR1 / SIGUSR2 set a flag instead of ending the process; the
    handlers that were there before come back on exit."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None  # the first signal's number
        self.count = 0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum
            log.warning("received %s: stopping at the next step boundary every rank agrees on, then saving",
                        signal.Signals(signum).name)
        elif self.count == 2:  # a second signal (the launcher's, the scheduler's): the save goes on
            log.warning("received %s again: already stopping; the checkpoint is being written, not interrupted",
                        signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


class StopVote:
    """The step boundary every rank stops at (see the module docstring). At every optimizer step's boundary,
    on every rank in the same order: ``decide()``, act on it, ``post()``; ``close()`` at the end."""

    def __init__(self, signals: StopSignals, every_minutes: float = 0.0):
        import torch.distributed as dist

        self.signals, self.every_s = signals, every_minutes * 60.0
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        # a gloo group over the same ranks: host tensors, its own connections, never on a CUDA stream
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.pending = None  # (work, tensor) posted at the previous boundary
        self.since = time.monotonic()  # the last checkpoint (wall clock, this rank)
        self.polls, self.seconds = 0, 0.0  # what the vote costs: boundaries, time spent in decide() + post()

    def flags(self) -> torch.Tensor:
        due = bool(self.every_s) and time.monotonic() - self.since >= self.every_s
        return torch.tensor([int(self.signals.received is not None), int(due)], dtype=torch.int32)

    def decide(self) -> Optional[str]:
        """At a step boundary: "signal" (save, then stop), "time" (save, go on) or None; the same on every rank.
        With peers it is the all-reduce :meth:`post` sent at the previous boundary (finished by now)."""
        started = time.perf_counter()
        verdict = None
        if not self.distributed:
            verdict = self.flags()
        elif self.pending is not None:
            work, verdict = self.pending
            work.wait()
            self.pending = None
        self.seconds += time.perf_counter() - started
        if verdict is None:
            return None
        if verdict[SIGNAL_BIT] > 0:
            return "signal"
        return "time" if verdict[TIME_BIT] > 0 else None

    def post(self) -> None:
        """After the boundary's decision (and its save, which restarts the wall-clock interval): this rank's
        flags in a non-blocking all-reduce, read by :meth:`decide` at the next boundary."""
        started = time.perf_counter()
        if self.distributed:
            import torch.distributed as dist

            t = self.flags()
            self.pending = (dist.all_reduce(t, group=self.group, async_op=True), t)
        self.polls += 1
        self.seconds += time.perf_counter() - started

    def saved(self) -> None:
        """A checkpoint was just written (every rank, same step): the wall-clock interval starts again."""
        self.since = time.monotonic()

    def close(self) -> None:
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None

    def cost(self) -> str:
        return f"{1e6 * self.seconds / max(1, self.polls):.0f} us per step over {self.polls} steps"


def preempted(signals: StopSignals, step: int, out_dir: str, tag: str) -> Preempted:
    """The exception that ends a run stopped by a signal; its message is the one line the main rank prints."""
    name = signal.Signals(signals.received).name if signals.received else "a signal to another rank"
    return Preempted(f"stopped by {name} after step {step} (every rank at that step): checkpoint "
                     f"{os.path.join(out_dir, 'ds', tag)} is complete; rerun the same command to continue from it "
                     f"(exit code {EXIT_PREEMPTED})", signals.received or 0, step)
