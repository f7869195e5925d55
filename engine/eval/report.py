"""Results files of finetuning runs and the paper-shaped report table over runs
(``python -m engine.eval report RUN [RUN ...]``)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from engine import checkpoint as ckpt_lib
from engine.config import IWMConfig
from engine.data import DataError

def write_result(cfg: IWMConfig, result) -> str:
    """``finetune.json`` in the run directory: what ``python -m engine.eval report`` reads."""
    path = os.path.join(cfg.train.out_dir, "finetune.json")
    ckpt_lib.atomic_write_json(path, {
        "protocol": cfg.finetune.protocol, "predictor_init": cfg.finetune.predictor_init,
        "encoder_weights": cfg.finetune.encoder_weights, "source": os.path.abspath(cfg.finetune.checkpoint),
        "step": result.step, **{k: float(v) for k, v in result.metrics.items()}})
    return path


COLUMNS = [("encoder FT", "encoder"), ("frozen enc + random pred", "predictor/random"),
           ("frozen enc + pretrained pred", "predictor/pretrained"), ("end-to-end", "end_to_end"),
           ("linear", "linear"), ("attentive", "attentive"), ("MRR", "mrr")]


def _source_run(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.dirname(path) if path.endswith((".pt", ".safetensors")) else path


def report_table(runs: List[str]) -> str:
    """A markdown table shaped like the paper's: a row per pretraining run, a column per protocol (top-1 %, the
    best kept checkpoint's) plus MRR. ``runs``: pretraining and finetuning run directories, in any order; a
    finetuning run joins the row of the pretraining run it started from."""
    rows: Dict[str, Dict[str, float]] = {}
    names: Dict[str, str] = {}

    def read(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    for run in runs:
        if not os.path.isdir(run):
            raise DataError(f"report: {run} is not a run directory")
        ft = read(os.path.join(run, "finetune.json"))
        if ft is not None:
            key = _source_run(ft["source"])
            column = ft["protocol"] + (f"/{ft['predictor_init']}" if ft["protocol"] == "predictor" else "")
            rows.setdefault(key, {})[column] = ft.get("best_top1", ft.get("top1"))
            continue
        key = os.path.abspath(run)
        cfg = read(os.path.join(run, "config.json"))
        if cfg is None and not os.path.isfile(os.path.join(run, "checkpoint.pt")):
            raise DataError(f"report: {run} holds neither a pretraining run (config.json) nor finetune.json")
        names[key] = (cfg or {}).get("name") or os.path.basename(key)
        row = rows.setdefault(key, {})
        for column, file, field in (("mrr", "mrr.json", "mrr"), ("linear", "linear.json", "val_top1"),
                                    ("attentive", "attentive.json", "val_top1")):
            got = read(os.path.join(run, file))
            if got is not None and field in got:
                row.setdefault(column, got[field])
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for key, row in rows.items():
        cells = []
        for _, col in COLUMNS:
            v = row.get(col)
            cells.append("" if v is None else (f"{v:.3f}" if col == "mrr" else f"{v:.1f}"))
        lines.append(f"| {names.get(key, os.path.basename(key))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
