"""A rank that dies or hangs: the others stop within ``train.watchdog_seconds`` and name it.

Without this, the ranks waiting for a silent one sit in their collective for the process group's timeout
(30 minutes; on NCCL a hang can last forever), and on CPU a killed gloo peer makes the others fail with a
connection traceback that names no rank. Each rank runs a heartbeat thread that, every
``watchdog_seconds / 10`` writes a small file ``out_dir/.heartbeat/rank_<r>`` (a beat counter,
the rank's progress through the steps, host, PID) and reads the others' files. A rank is silent when

- its heartbeat has not changed for ``watchdog_seconds`` (the process is stopped, frozen, killed, or its
  node is gone: a stopped process's threads stop too), or
- it wrote that its own code raised (then at the next beat), or
- its progress has stayed behind another rank's for ``watchdog_seconds`` (alive, but stuck before the
  step's collective, e.g. in its data loader), once it has finished its first step (the first one, with
  its start-up and kernel compiles, is allowed to be slow).

The rank that sees it prints one line naming the silent rank (host, PID, last step) and the checkpoint a
rerun resumes from, and ends its process with exit code 76 (``engine/preempt.py``): its main thread may be
blocked in a collective that never returns, so the thread ends the process. The DeepSpeed launcher, srun
(``--kill-on-bad-exit=1``) and submitit then end the silent rank too. Bound: a silent rank is named and
the others stop at most ``watchdog_seconds`` plus one beat after it went silent (measured in
tests/engine/test_preempt_ranks.py). A hang in which every rank stays level (one rank stuck inside a step's
compute while the others wait in its collective) is left to the process group's timeout.

The files live in the run directory, which every rank already shares for its checkpoints: no server (the
rendezvous store lives in rank 0's process, which is exactly the one that may be stopped), no clock
comparison between hosts (a change is timed by the reader's own clock). Every rank reads every rank's
file, so each one stops on its own (no chain of neighbours): N ranks open N x N small files per beat, e.g.
256 ranks at the default 300 s (a beat every 30 s) about 2,200 opens per second on the shared file system.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from engine.preempt import EXIT_PEER_LOST

DONE = "done"  # what a rank writes when it leaves the run normally (or at an agreed stop): not silent
FAILED = "failed"  # what a rank writes when its own code raised: the others stop at the next beat


class Watchdog:
    def __init__(self, out_dir: str, rank: int, world_size: int, timeout_s: float,
                 resume_note: Callable[[], str], on_exit: Callable[[], None] = lambda: None):
        self.folder = os.path.join(out_dir, ".heartbeat")
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout_s)
        self.interval = max(0.05, self.timeout / 10)
        self.resume_note, self.on_exit = resume_note, on_exit
        self.step = 0  # the last finished optimizer step (what the line reports)
        self._progress = 0  # 2 x steps finished, + 1 while a step's micro-batches are in hand
        self._beat = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: Dict[int, Tuple[str, float]] = {}  # peer -> (its file's text, when it last changed)
        self._moved: Dict[int, Tuple[int, float]] = {}  # rank -> (progress, when it last changed)
        self.host, self.pid = socket.gethostname(), os.getpid()

    # ---- the main thread's side (no I/O, no sync: two integer assignments per step) ------------------
    def started_step(self, step: int) -> None:
        self._progress = 2 * step + 1

    def finished_step(self, step: int) -> None:
        self.step, self._progress = step, 2 * step

    def start(self) -> "Watchdog":
        os.makedirs(self.folder, exist_ok=True)
        now = time.monotonic()
        self._seen = {r: ("", now) for r in range(self.world_size) if r != self.rank}
        self._moved = {r: (0, now) for r in range(self.world_size)}
        self._write()
        self._thread = threading.Thread(target=self._run, name="iwm-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: str = DONE) -> None:
        """The thread ends and the file says ``state``: DONE (peers do not count it as silent) or FAILED."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._write(state)

    def wait_for_verdict(self) -> None:
        """After a communication error: give the thread time to name a silent peer (it ends the process
        if it finds one); return if none is found."""
        if self._thread is not None:
            self._stop.wait(self.timeout + 3 * self.interval)

    # ---- the thread --------------------------------------------------------------------------------
    def _path(self, rank: int) -> str:
        return os.path.join(self.folder, f"rank_{rank:05d}")

    def _write(self, state: Optional[str] = None) -> None:
        self._beat += 1
        text = state or f"{self._beat} {self._progress} {self.step} {self.host} {self.pid}"
        try:
            with open(self._path(self.rank), "w") as f:  # in place: NFS readers see it at open()
                f.write(text + "\n")
        except OSError:
            pass  # a full or flaky disk must not stop training; peers see a stale beat only if it lasts

    def _read(self, rank: int) -> Optional[str]:
        try:
            with open(self._path(rank)) as f:
                text = f.read().strip()
        except OSError:
            return None
        return text or None  # empty: read while the writer truncated it

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            verdict = self.check(time.monotonic())
            if verdict is not None:
                self._fail(*verdict)

    def check(self, now: float) -> Optional[Tuple[int, str]]:
        """(silent rank, why) or None, from the peers' files as read now."""
        progress = {self.rank: self._progress}
        info: Dict[int, List[str]] = {}
        for r, (text, changed) in list(self._seen.items()):
            new = self._read(r)
            if new == DONE:
                self._seen[r] = (DONE, now)
                continue
            if new == FAILED:
                return r, "its own code raised an error (the traceback is in its log)"
            if new is not None and new != text:
                self._seen[r] = (new, now)
            text, changed = self._seen[r]
            fields = text.split()
            if len(fields) == 5:
                info[r] = fields
                progress[r] = int(fields[1])
            if text != DONE and now - changed > self.timeout:
                return r, f"no heartbeat for {now - changed:.1f} s{self._where(info.get(r))}"
        for r, p in progress.items():
            if self._moved[r][0] != p:
                self._moved[r] = (p, now)
        top = max(progress.values())
        for r in sorted(progress):  # judged once it finished a step: the first one (start-up, compiles) is not
            if 2 <= progress[r] < top and now - self._moved[r][1] > self.timeout:
                return r, (f"alive but no progress for {now - self._moved[r][1]:.1f} s while another rank is a "
                           f"step ahead{self._where(info.get(r))}")
        return None

    @staticmethod
    def _where(fields: Optional[List[str]]) -> str:
        return f" (host {fields[3]}, PID {fields[4]}, last finished step {fields[2]})" if fields else ""

    def _fail(self, rank: int, why: str) -> None:
        who = "this rank" if rank == self.rank else f"rank {rank}"
        print(f"error: {who} of {self.world_size} went silent: {why}; rank {self.rank} stops now (exit code "
              f"{EXIT_PEER_LOST}); {self.resume_note()}", file=sys.stderr, flush=True)
        try:
            self.on_exit()
        finally:
            os._exit(EXIT_PEER_LOST)
