"""Per-step schedules (docs/method.md "Optimisation", I-JEPA): LR linear warmup then cosine, weight-decay cosine, EMA ramp."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, start_lr: float, lr: float, final_lr: float) -> float:
    """Linear warmup start_lr -> lr over `warmup` steps, then cosine lr -> final_lr until `total`."""
    if step < warmup:
        return start_lr + (lr - start_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(step: int, total: int, start: float, end: float) -> float:
    """Cosine ramp start -> end over the run."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum_at(step: int, total: int, start: float, end: float) -> float:
    """Linear ramp start -> end over the run."""
    return start + (end - start) * min(1.0, step / max(1, total))
