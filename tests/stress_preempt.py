"""Stress: a signal at 10 random moments of a 2-rank CPU run under the DeepSpeed launcher (alternating
SIGUSR1 to a random rank and SIGTERM to the launcher); each rerun must continue from the signal's step with
the uninterrupted run's losses and weights bit for bit. Not collected by pytest (no ``test_`` prefix):

    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/stress_preempt.py [--trials 10] [--seed 0] [--out FILE.json]

Prints one line per trial and a summary; exit code 1 if any trial failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.engine.test_preempt_ranks import STEPS, losses, run_to_end, signal_trial, weights  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the trials as JSON")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="stress_preempt_") as tmp:
        tmp = Path(tmp)
        started = time.time()
        run_to_end(tmp / "ref", launcher=True, workers=1)
        reference = losses(tmp / "ref"), weights(tmp / "ref")
        assert sorted(reference[0]) == list(range(1, STEPS + 1))
        for trial in range(args.trials):
            target = "rank" if trial % 2 == 0 else "launcher"
            t0 = time.time()
            try:
                stopped = signal_trial(tmp, reference, rng, trial, target)
                ok, detail = True, f"stopped after step {stopped}, rerun bit-exact"
            except Exception as e:  # a failed trial is reported, the others still run
                ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            results.append({"trial": trial, "target": target, "ok": ok, "detail": detail,
                            "seconds": round(time.time() - t0, 1)})
            print(f"trial {trial:2d} ({'SIGUSR1 to a rank' if target == 'rank' else 'SIGTERM to the launcher'}): "
                  f"{'ok' if ok else 'FAILED'}: {detail}", flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{passed}/{len(results)} trials continued bit-exact ({time.time() - started:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trials": results, "passed": passed, "steps": STEPS}, f, indent=2)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
