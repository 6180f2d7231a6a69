"""Learning-rate schedules as pure functions of the optimizer step.

Being stateless (lr = f(step, total_steps)), a resumed run only needs the step counter to continue on
exactly the same schedule.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "step", "cosine", "cyclic")

# "step": multiply by 0.1 at these fractions of training (the usual CIFAR ResNet 50% / 75% decay).
STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1


def lr_at(schedule: str, step: int, total_steps: int, base_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) out of ``total_steps``.

    cyclic is the one-cycle triangle of FastAT (Wong et al. 2020): 0 -> base_lr at 40% of training
    -> 0 at the end.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    total = max(1, int(total_steps))
    t = min(max(step, 0), total) / total
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * STEP_GAMMA ** sum(t >= m for m in STEP_MILESTONES)
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))
    peak = 0.4
    # evaluate at the middle of the step so the first step's lr is not exactly 0
    t = min((step + 0.5) / total, 1.0)
    return base_lr * (t / peak if t < peak else (1.0 - t) / (1.0 - peak))
