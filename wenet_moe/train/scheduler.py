"""Learning-rate schedules, stepped once per optimizer step.

`step` below is 1-based (the first optimizer step uses step 1), as in WeNet.

- warmuplr (WeNet's): lr = base * warmup^0.5 * min(step^-0.5, step * warmup^-1.5);
  with warmup_steps 0: lr = base * step^-0.5.
- cosine: linear warmup base * step / warmup, then
  final + (base - final) * 0.5 * (1 + cos(pi * p)), p = (step - warmup) / (max_steps - warmup)
  clipped to [0, 1].
- constant: base * min(1, step / warmup) (warmup optional).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch.optim.lr_scheduler import LRScheduler

from wenet_moe.config import ConfigError, check_keys


def warmuplr_factor(step: int, warmup_steps: float) -> float:
    """Multiplier of the base lr at 1-based `step` for WeNet's WarmupLR."""
    step = max(step, 1)
    if warmup_steps <= 0:
        return step ** -0.5
    return warmup_steps ** 0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)


def cosine_lr(step: int, base_lr: float, warmup_steps: int, max_steps: int, final_lr: float) -> float:
    """Learning rate at 1-based `step` for linear warmup then cosine decay."""
    step = max(step, 1)
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_factor(step: int, warmup_steps: int) -> float:
    step = max(step, 1)
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


class WarmupLR(LRScheduler):
    """WeNet's Noam-style warmup then inverse-sqrt decay."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: float = 25000, last_epoch: int = -1):
        self.warmup_steps = float(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        f = warmuplr_factor(self.last_epoch + 1, self.warmup_steps)
        return [base * f for base in self.base_lrs]


class WarmupCosineLR(LRScheduler):
    """Linear warmup, then cosine decay from the base lr to `final_lr` at `max_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                 final_lr: float = 0.0, last_epoch: int = -1):
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.final_lr = float(final_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        step = self.last_epoch + 1
        return [cosine_lr(step, base, self.warmup_steps, self.max_steps, self.final_lr)
                for base in self.base_lrs]


class ConstantLR(LRScheduler):
    """Constant lr after an optional linear warmup."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, last_epoch: int = -1):
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        f = constant_factor(self.last_epoch + 1, self.warmup_steps)
        return [base * f for base in self.base_lrs]


SCHEDULER_KEYS = {
    "warmuplr": ("warmup_steps",),
    "cosine": ("warmup_steps", "max_steps", "final_lr"),
    "constant": ("warmup_steps",),
}


def _number(conf: Dict[str, Any], key: str, default: Any, where: str, minimum: float = 0.0) -> float:
    value = conf.get(key, default)
    if value is None:
        raise ConfigError(f"'{where}.{key}' is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"'{where}.{key}' must be a number >= {minimum:g}, got {value!r}")
    return value


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, conf: Dict[str, Any]) -> LRScheduler:
    """Scheduler by config name (`scheduler`) and keys (`scheduler_conf`)."""
    conf = dict(conf or {})
    if name not in SCHEDULER_KEYS:
        raise ConfigError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULER_KEYS)})")
    check_keys(conf, SCHEDULER_KEYS[name], "scheduler_conf")
    if name == "warmuplr":
        return WarmupLR(optimizer, _number(conf, "warmup_steps", 25000, "scheduler_conf"))
    if name == "cosine":
        warmup = int(_number(conf, "warmup_steps", 0, "scheduler_conf"))
        max_steps = int(_number(conf, "max_steps", None, "scheduler_conf", minimum=1))
        if max_steps < warmup:
            raise ConfigError(f"'scheduler_conf.max_steps' ({max_steps}) must be >= warmup_steps ({warmup})")
        return WarmupCosineLR(optimizer, warmup, max_steps, _number(conf, "final_lr", 0.0, "scheduler_conf"))
    return ConstantLR(optimizer, int(_number(conf, "warmup_steps", 0, "scheduler_conf")))


def schedule_advice(scheduler: LRScheduler, steps_per_epoch: int, max_epoch: int) -> str:
    """A warning (or "") when the schedule does not fit the run's length.

    WeNet's `warmup_steps: 25000` assumes ~100k+ steps; on a small corpus the lr is
    still rising when training ends, which keeps small models on the CTC all-blank
    plateau for many epochs (docs/training.md). Cosine `max_steps` far from the run's
    total wastes epochs at `final_lr` or never decays.
    """
    total = steps_per_epoch * max_epoch
    if total <= 0:
        return ""
    if isinstance(scheduler, (WarmupLR, ConstantLR, WarmupCosineLR)) and scheduler.warmup_steps > 0.3 * total:
        return (f"scheduler_conf.warmup_steps {scheduler.warmup_steps:g} is {scheduler.warmup_steps / total:.0%} "
                f"of this run ({steps_per_epoch} steps/epoch x {max_epoch} epochs = {total} steps): the lr peaks "
                f"late or never; about 5-10% of the run is a good warmup")
    if isinstance(scheduler, WarmupCosineLR) and not (0.5 * total <= scheduler.max_steps <= 2 * total):
        return (f"scheduler_conf.max_steps {scheduler.max_steps} vs {total} steps in this run "
                f"({steps_per_epoch} steps/epoch x {max_epoch} epochs): set it near the run's length")
    return ""
