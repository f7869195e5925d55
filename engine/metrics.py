"""Run logs: a CSV row per logged step, TensorBoard scalars, and a loss / MRR / monitors plot (PNG)."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional

from engine.checkpoint import atomic_write
from engine.monitors import COLLAPSE_RANK, COLLAPSE_STD


class MetricLogger:
    """Writes on the main rank only; other ranks get a logger that does nothing."""

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        self.plot_path = os.path.join(out_dir, "curves.png")
        self.rows: List[Dict[str, float]] = []
        self._header: List[str] = []  # the columns of the CSV file on disk
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.csv_path):  # a resumed run keeps its history
            with open(self.csv_path, newline="") as f:
                self.rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def drop_after(self, step: int) -> None:
        """On resume: forget rows logged after the checkpoint's step."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        self._rewrite()

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        row = {"step": float(step), **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        if self._header and set(row) <= set(self._header):
            with open(self.csv_path, "a", newline="") as f:  # the common case: one appended line
                csv.DictWriter(f, fieldnames=self._header).writerow(row)
        else:
            self._rewrite()  # a new column (e.g. the first MRR): rewrite once with the wider header
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def _rewrite(self) -> None:
        if not self.enabled:
            return
        keys: List[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        self._header = keys
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                for r in self.rows:
                    w.writerow(r)

        atomic_write(self.csv_path, write)

    def series(self, key: str):
        pts = [(r["step"], r[key]) for r in self.rows if key in r and not math.isnan(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, chance_mrr: Optional[float] = None) -> Optional[str]:
        """curves.png: the loss, the MRR and, when logged, the collapse monitors (engine/monitors.py)."""
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        monitored = any("target_std" in r for r in self.rows)
        fig, axes = plt.subplots(2 if monitored else 1, 2, figsize=(10, 7.2 if monitored else 3.6), squeeze=False)
        self._plot_loss_mrr(axes[0, 0], axes[0, 1], chance_mrr)
        if monitored:
            self._plot_monitors(axes[1, 0], axes[1, 1])
        fig.tight_layout()
        atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        return self.plot_path

    def _plot_loss_mrr(self, ax1, ax2, chance_mrr: Optional[float]) -> None:
        ax1.plot(*self.series("loss"), lw=1)
        ax1.set_xlabel("step")
        ax1.set_ylabel("L2 loss")
        ax1.set_yscale("log")
        ax1.set_title("training loss")
        steps, mrr = self.series("mrr")
        ax2.plot(steps, mrr, "o-")
        if chance_mrr is not None:
            ax2.axhline(chance_mrr, ls="--", c="gray", label=f"chance {chance_mrr:.3f}")
            ax2.legend()
        ax2.set_xlabel("step")
        ax2.set_ylabel("MRR")
        ax2.set_ylim(0, max([0.1, *(1.25 * v for v in mrr)]))  # MRR is in (0, 1]; zoom on small values
        ax2.set_title("world-model MRR")

    def _plot_monitors(self, ax1, ax2) -> None:
        ax1.plot(*self.series("target_std"), lw=1, c="C0", label="target std across images")
        ax1.axhline(COLLAPSE_STD, ls="--", c="C0", lw=0.8)
        ax1.set_ylim(0, 1)
        ax1.set_xlabel("step")
        ax1.set_ylabel("target std (layer-normed: <= 1)")
        twin = ax1.twinx()
        twin.plot(*self.series("rankme"), lw=1, c="C1", label="RankMe")
        twin.axhline(COLLAPSE_RANK, ls="--", c="C1", lw=0.8)
        twin.set_ylim(bottom=0)
        twin.set_ylabel("RankMe")
        ax1.legend(handles=ax1.get_lines()[:1] + twin.get_lines()[:1], loc="lower right", fontsize=8)
        ax1.set_title("targets (dashed: collapse thresholds)")
        for key, label in (("pred_spread", "spread across positions"), ("spatial_r2", "spatial R^2"),
                           ("action_effect", "action effect")):
            ax2.plot(*self.series(key), lw=1, label=label)
        ax2.axhline(0, c="gray", lw=0.5)
        ax2.set_xlabel("step")
        ax2.set_title("predictor")
        ax2.legend(fontsize=8)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
