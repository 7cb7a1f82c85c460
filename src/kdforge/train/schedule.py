"""Learning-rate schedules as LambdaLR multipliers: warmup + cosine / constant / warmup-stable-decay.

The multiplier is a small picklable object, so `scheduler.state_dict()` is plain data and a
resumed scheduler continues exactly where it stopped.
"""

from __future__ import annotations

import math

import torch


class LRMultiplier:
    """lr(step) / peak_lr. `total_steps` None (an open-ended stream, e.g. the daemon) means the
    schedule never decays: cosine and wsd stay at the peak after warmup."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int | None,
                 min_ratio: float = 0.1, decay_fraction: float = 0.2):
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.decay_fraction = decay_fraction

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant" or not self.total_steps:
            return 1.0
        T, W, m = self.total_steps, self.warmup_steps, self.min_ratio
        if self.kind == "cosine":
            progress = min(1.0, (step - W) / max(1, T - W))
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd":  # warmup, stable at peak, then linear decay over the last fraction
            decay_start = T - int(self.decay_fraction * T)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, T - decay_start))
            return 1.0 - (1 - m) * progress
        raise ValueError(f"unknown schedule {self.kind!r}")


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int | None,
                   min_ratio: float = 0.1, decay_fraction: float = 0.2):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRMultiplier(kind, warmup_steps, total_steps, min_ratio, decay_fraction))
