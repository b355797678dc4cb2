"""Optimisers: they own the update rule's state and its schedule, and call a backend to apply it."""

import math

from xpnet.backends.base import AdamRule
from xpnet.errors import ConfigError
from xpnet.nn.schedules import Schedule


# Each setting's range, as what is wrong with a value (None: nothing), so TrainConfig's
# declaration and the optimiser check the same thing.
def lr_error(lr):
    return None if math.isfinite(lr) and lr > 0 else "must be a finite number above 0"


def momentum_error(momentum):
    return None if math.isfinite(momentum) and 0 <= momentum < 1 else "must be in [0, 1)"


def weight_decay_error(weight_decay):
    return None if math.isfinite(weight_decay) and weight_decay >= 0 else "must be a finite number >= 0"


def check_ranges(*settings):
    """Raise ConfigError for the first (name, value, error) whose error(value) says what is wrong."""
    for name, value, error in settings:
        problem = error(value)
        if problem is not None:
            raise ConfigError(f"{name} {problem}, got {value}")


class Optimizer:
    """What every optimiser shares: its parameters, its base rate and per-step schedule (a
    schedules.Schedule, or a schedule's name with the run's total_steps), and the count of steps
    taken. A subclass names itself (name, as checkpoints record it), keeps its arrays in `state`
    by name, one per parameter each, as checkpoints store them, and updates in apply(ops, lr)."""

    name = None

    def __init__(self, backend, parameters, lr, schedule, total_steps):
        self.backend, self.parameters, self.lr = backend, list(parameters), lr
        self.schedule = Schedule.of(schedule, total_steps)
        self.steps_taken = 0
        self.state = {}

    def current_lr(self):
        """The learning rate of the next step, by the schedule."""
        return self.lr_at(self.steps_taken)

    def lr_at(self, step):
        """The learning rate of a step (counted from 0 over the run), by the schedule."""
        return self.schedule.lr_at(self.lr, step)

    def apply(self, ops, lr):
        """Update every parameter from its gradient, in place, at rate lr, through ops: the
        backend, or a compiled path's own version of it."""
        raise NotImplementedError

    def step(self):
        """Update every parameter from its gradient at the scheduled rate, and count the step."""
        self.apply(self.backend, self.current_lr())
        self.steps_taken += 1


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (heavy-ball or Nesterov, as
    torch.optim.SGD defines them) and L2 weight decay. state holds a "velocity" with momentum,
    nothing without.
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
        check_ranges(
            ("the learning rate", lr, lr_error),
            ("momentum", momentum, momentum_error),
            ("weight decay", weight_decay, weight_decay_error),
        )
        if nesterov and not momentum > 0:
            raise ConfigError("Nesterov momentum needs a momentum above 0, e.g. 0.9")
        super().__init__(backend, parameters, lr, schedule, total_steps)
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        if momentum:
            self.state["velocity"] = [backend.xp.zeros_like(p.value) for p in self.parameters]

    @classmethod
    def from_config(cls, backend, parameters, config, schedule):
        return cls(backend, parameters, config.lr, config.momentum, config.nesterov, config.weight_decay, schedule)

    def apply(self, ops, lr):
        """CuPy's graphs pass ops whose products can be captured, and lr as a device array."""
        values, grads = [p.value for p in self.parameters], [p.grad for p in self.parameters]
        velocities = self.state.get("velocity")
        ops.sgd_update_all(values, grads, lr, velocities, self.momentum, self.nesterov, self.weight_decay)


def betas_error(betas):
    ok = len(betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in betas)
    return None if ok else "must be two numbers in [0, 1), e.g. 0.9,0.999"


def eps_error(eps):
    return None if math.isfinite(eps) and eps > 0 else "must be a finite number above 0"


class Adam(Optimizer):
    """Adam, as torch.optim.Adam defines it (bias-corrected moving averages of the gradient and
    its square, eps added to the corrected root), with L2 weight decay added to the gradient;
    the backend's adam_update has the equation.

    state holds "exp_avg" and "exp_avg_sq", one per parameter each, as torch names them; the
    bias correction counts steps_taken, which checkpoints keep.
    """

    name = "adam"
    decoupled = False  # AdamW's weight decay

    def __init__(
        self,
        backend,
        parameters,
        lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        schedule="constant",
        total_steps=1,
    ):
        check_ranges(
            ("the learning rate", lr, lr_error),
            ("weight decay", weight_decay, weight_decay_error),
            ("betas", tuple(betas), betas_error),
            ("eps", eps, eps_error),
        )
        super().__init__(backend, parameters, lr, schedule, total_steps)
        self.rule = AdamRule(float(betas[0]), float(betas[1]), float(eps), float(weight_decay), self.decoupled)
        for name in ("exp_avg", "exp_avg_sq"):
            self.state[name] = [backend.xp.zeros_like(p.value) for p in self.parameters]

    @classmethod
    def from_config(cls, backend, parameters, config, schedule):
        return cls(backend, parameters, config.lr, config.betas, config.eps, config.weight_decay, schedule)

    def apply(self, ops, lr):
        """Update every parameter from its gradient, in place, at rate lr: the step's bias
        correction counts this step (steps_taken + 1)."""
        state = zip(self.parameters, self.state["exp_avg"], self.state["exp_avg_sq"])
        for p, exp_avg, exp_avg_sq in state:
            ops.adam_update(p.value, p.grad, exp_avg, exp_avg_sq, lr, self.steps_taken + 1, self.rule)


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW defines it: each step first scales
    the parameters by 1 - lr * weight_decay (torch's default weight_decay there is 0.01)."""

    name = "adamw"
    decoupled = True


# Each optimiser by the name TrainConfig's `optimizer` setting gives (and checkpoints record).
OPTIMIZERS = {kind.name: kind for kind in (SGD, Adam, AdamW)}


def make_optimizer(backend, parameters, config, steps_per_epoch):
    """The optimiser a TrainConfig names (OPTIMIZERS), with its settings and schedule."""
    return OPTIMIZERS[config.optimizer].from_config(backend, parameters, config, config.lr_schedule(steps_per_epoch))
