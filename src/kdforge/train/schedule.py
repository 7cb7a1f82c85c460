"""Learning-rate schedules as LambdaLR multipliers: warmup + cosine / constant / warmup-stable-decay.

The multiplier is a small picklable object, so `scheduler.state_dict()` is plain data and a
resumed scheduler continues exactly where it stopped.
"""

from __future__ import annotations

import copy
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


def train_schedule(train, total_steps: int | None) -> LRMultiplier:
    """The multiplier the `train:` section describes, over `total_steps` optimizer steps."""
    return LRMultiplier(train.schedule, train.warmup_steps, total_steps, train.min_lr_ratio, train.decay_fraction)


def apply_schedule(scheduler, multiplier: LRMultiplier) -> None:
    """Give every param group (matrices, and norms/biases without weight decay) the shape
    `multiplier`, keeping the scheduler's step count. A resumed scheduler's state holds the
    shape it was saved with; this replaces it with today's config (a raised train.max_steps
    extends the cosine instead of idling at its floor), and sets each group's lr for the very
    next step as LambdaLR itself would (bitwise: the same product), so no step runs on the old one."""
    # One copy per group: LambdaLR.load_state_dict updates its multipliers' attributes in place,
    # and must never reach back into the caller's object.
    scheduler.lr_lambdas = [copy.copy(multiplier) for _ in scheduler.optimizer.param_groups]
    lrs = [base * multiplier(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (LambdaLR keeps it here)
