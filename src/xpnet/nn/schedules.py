"""Learning-rate schedules: the rate of each step of a run, as torch.optim.lr_scheduler defines it.

A schedule is a pure function of the step, so every path (the reference loop, Numba's compiled
loop, CuPy's graphs) gets the same rates: the trainer hands each chunk of steps its rates.

- constant: lr.
- cosine: lr * (1 + cos(pi * k / K)) / 2 at step k of K, down to 0 at the end and staying there
  (CosineAnnealingLR, eta_min 0, stepped each step).
- step: lr * gamma ** (e // step_size) in epoch e (StepLR, stepped each epoch).
- exponential: lr * gamma ** e in epoch e (ExponentialLR, stepped each epoch).

With warmup_epochs W, the first N = W epochs' steps rise linearly, lr * (k + 1) / N at step k
(LinearLR with start_factor 1/N over N - 1 steps), and the schedule then runs over the rest of
the run as if it began there (SequentialLR with one milestone at N).
"""

import math
from dataclasses import dataclass

from xpnet.errors import ConfigError

NAMES = ("constant", "cosine", "step", "exponential")


def cosine_lr(base_lr, step, total_steps):
    """lr * (1 + cos(pi * step / total)) / 2: from lr down to 0 over the run."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


# Each setting's range, as what is wrong with a value (None: nothing), for TrainConfig's declaration.
def gamma_error(gamma):
    return None if math.isfinite(gamma) and 0 < gamma <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class Schedule:
    """The schedule of one run: its name (NAMES), the run's length, and the step and exponential
    schedules' factor (gamma) and period (step_size, epochs), and the warmup's length."""

    name: str = "constant"
    total_steps: int = 1
    steps_per_epoch: int = 1
    gamma: float = 0.1
    step_size: int = 10
    warmup_epochs: int = 0

    def __post_init__(self):
        if self.name not in NAMES:
            raise ConfigError(f"unknown learning-rate schedule {self.name!r}: choose one of {', '.join(NAMES)}")

    @classmethod
    def of(cls, schedule, total_steps=1):
        """schedule itself where it is a Schedule; else the schedule of that name over total_steps."""
        return cls(schedule, max(total_steps, 1)) if isinstance(schedule, str) else schedule

    def lr_at(self, base_lr, step):
        """The rate of step `step` (counted from 0 over the run; past its end too)."""
        warmup = self.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return base_lr * (step + 1) / warmup
        step -= warmup
        epoch = step // self.steps_per_epoch
        if self.name == "cosine":
            return cosine_lr(base_lr, step, max(self.total_steps - warmup, 1))
        if self.name == "step":
            return base_lr * self.gamma ** (epoch // self.step_size)
        if self.name == "exponential":
            return base_lr * self.gamma**epoch
        return base_lr
