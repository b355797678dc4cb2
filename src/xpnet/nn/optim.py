"""Optimisers: they own the update rule's state and its schedule, and call a backend to apply it."""

import math

from xpnet.errors import ConfigError
from xpnet.nn.schedules import NAMES, Schedule


# Each setting's range, as what is wrong with a value (None: nothing), so TrainConfig's
# declaration and the optimiser check the same thing.
def lr_error(lr):
    return None if math.isfinite(lr) and lr > 0 else "must be a finite number above 0"


def momentum_error(momentum):
    return None if math.isfinite(momentum) and 0 <= momentum < 1 else "must be in [0, 1)"


def weight_decay_error(weight_decay):
    return None if math.isfinite(weight_decay) and weight_decay >= 0 else "must be a finite number >= 0"


def check_sgd_settings(lr, momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant"):
    """Raise ConfigError, saying what to use instead, for settings SGD cannot train with."""
    for name, value, error in (
        ("the learning rate", lr, lr_error),
        ("momentum", momentum, momentum_error),
        ("weight decay", weight_decay, weight_decay_error),
    ):
        problem = error(value)
        if problem is not None:
            raise ConfigError(f"{name} {problem}, got {value}")
    if nesterov and not momentum > 0:
        raise ConfigError("Nesterov momentum needs a momentum above 0, e.g. 0.9")
    if isinstance(schedule, str) and schedule not in NAMES:
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}: choose one of {', '.join(NAMES)}")


class SGD:
    """Stochastic gradient descent with optional momentum (heavy-ball or Nesterov, as
    torch.optim.SGD defines them), L2 weight decay, and a per-step learning-rate schedule:
    a schedules.Schedule, or a schedule's name with the run's total_steps.

    state holds its arrays by name, one per parameter each, as checkpoints store them: a
    "velocity" with momentum, nothing without.
    """

    name = "sgd"

    def __init__(
        self,
        backend,
        parameters,
        lr,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        schedule="constant",
        total_steps=1,
    ):
        check_sgd_settings(lr, momentum, nesterov, weight_decay, schedule)
        self.backend = backend
        self.parameters = list(parameters)
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.schedule = Schedule(schedule, max(total_steps, 1)) if isinstance(schedule, str) else schedule
        self.steps_taken = 0
        self.state = {"velocity": [backend.xp.zeros_like(p.value) for p in self.parameters]} if momentum else {}

    def current_lr(self):
        """The learning rate of the next step, by the schedule."""
        return self.lr_at(self.steps_taken)

    def lr_at(self, step):
        """The learning rate of a step (counted from 0 over the run), by the schedule."""
        return self.schedule.lr_at(self.lr, step)

    def apply(self, ops, lr):
        """Update every parameter from its gradient, in place, at rate lr, through ops: the
        backend, or a compiled path's own version of it (CuPy's graphs pass ops whose products
        can be captured, and lr as a device array)."""
        values, grads = [p.value for p in self.parameters], [p.grad for p in self.parameters]
        velocities = self.state.get("velocity")
        ops.sgd_update_all(values, grads, lr, velocities, self.momentum, self.nesterov, self.weight_decay)

    def step(self):
        """Update every parameter from its gradient at the scheduled rate, and count the step."""
        self.apply(self.backend, self.current_lr())
        self.steps_taken += 1
