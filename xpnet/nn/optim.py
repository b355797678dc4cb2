"""Optimisers: they own the update rule's state and its schedule, and call the backend to apply it."""

import math

from xpnet.errors import ConfigError


def cosine_lr(base_lr, step, total_steps):
    """lr * (1 + cos(pi * step / total)) / 2: from lr down to 0 over the run."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


SCHEDULES = {
    "constant": lambda base_lr, step, total_steps: base_lr,
    "cosine": cosine_lr,
}


def check_sgd_settings(lr, momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant"):
    """Raise ConfigError, saying what to use instead, for settings SGD cannot train with."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the learning rate must be a finite number above 0, got {lr}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}; 0.9 is usual")
    if nesterov and not momentum > 0:
        raise ConfigError("Nesterov momentum needs a momentum above 0, e.g. 0.9")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight decay must be a finite number >= 0, got {weight_decay}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


class SGD:
    """Stochastic gradient descent with optional momentum (heavy-ball or Nesterov, as
    torch.optim.SGD defines them), L2 weight decay, and a per-step learning-rate schedule."""

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
        self.schedule, self.total_steps = SCHEDULES[schedule], max(total_steps, 1)
        self.steps_taken = 0
        self.velocities = [backend.xp.zeros_like(p.value) if momentum else None for p in self.parameters]

    def current_lr(self):
        """The learning rate of the next step, by the schedule."""
        return self.lr_at(self.steps_taken)

    def lr_at(self, step):
        """The learning rate of a step (counted from 0 over the run), by the schedule."""
        return self.schedule(self.lr, step, self.total_steps)

    def step(self):
        """Update every parameter from its gradient, in place."""
        lr = self.current_lr()
        for p, velocity in zip(self.parameters, self.velocities):
            self.backend.sgd_update(p.value, p.grad, lr, velocity, self.momentum, self.nesterov, self.weight_decay)
        self.steps_taken += 1
