"""The optimiser's rule and schedule against an independent float64 implementation."""

import math

import numpy
import pytest

from xpnet.backends import get_backend
from xpnet.errors import ConfigError
from xpnet.nn.config import TrainConfig
from xpnet.nn.layers import Parameter
from xpnet.nn.optim import SGD, Adam, AdamW
from xpnet.nn.schedules import Schedule, cosine_lr


def torch_sgd_reference(param, grads, lr, momentum, nesterov, weight_decay):
    """torch.optim.SGD's documented algorithm (first step: buffer = g), step by step."""
    velocity = None
    for g in grads:
        g = g + weight_decay * param
        if momentum:
            velocity = g.copy() if velocity is None else momentum * velocity + g
            g = g + momentum * velocity if nesterov else velocity
        param = param - lr * g
    return param


def torch_adam_reference(param, grads, lr, betas, eps, weight_decay, decoupled):
    """torch.optim.Adam's and AdamW's documented algorithm (amsgrad off, not maximising), as its
    pseudocode writes it: m_hat and v_hat formed, then the update."""
    beta1, beta2 = betas
    m, v = numpy.zeros_like(param), numpy.zeros_like(param)
    for t, g in enumerate(grads, 1):
        if decoupled:
            param = param * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * param
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        param = param - lr * m_hat / (numpy.sqrt(v_hat) + eps)
    return param, m, v


@pytest.mark.parametrize("kind", [Adam, AdamW])
@pytest.mark.parametrize("betas, eps, weight_decay", [((0.9, 0.999), 1e-8, 0.0), ((0.8, 0.99), 1e-3, 0.05)])
def test_adam_and_adamw_match_torchs_definition_over_50_steps(backend, kind, betas, eps, weight_decay):
    rng = numpy.random.default_rng(1)
    start = rng.standard_normal((5, 3))
    grads = [rng.standard_normal((5, 3)) * 10.0 ** rng.integers(-3, 2) for _ in range(50)]
    parameter = Parameter(backend, start)
    optimizer = kind(backend, [parameter], 0.01, betas, eps, weight_decay)
    for g in grads:
        parameter.grad[...] = backend.asarray(g)
        optimizer.step()
    expected, m, v = torch_adam_reference(start, grads, 0.01, betas, eps, weight_decay, kind is AdamW)
    # The same float64 operations in another order and grouping (m_hat formed or folded into the
    # step size): a few roundings a step, compounding over 50 steps.
    numpy.testing.assert_allclose(backend.to_numpy(parameter.value), expected, rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(backend.to_numpy(optimizer.state["exp_avg"][0]), m, rtol=1e-12, atol=1e-15)
    numpy.testing.assert_allclose(backend.to_numpy(optimizer.state["exp_avg_sq"][0]), v, rtol=1e-12, atol=1e-18)
    assert optimizer.steps_taken == 50


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in \\[0, 1\\)"),
        ({"eps": 0.0}, "eps must be a finite number above 0"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
    ],
)
def test_adam_refuses_settings_it_cannot_train_with(settings, message):
    with pytest.raises(ConfigError, match=message):
        Adam(get_backend("numpy"), [], 0.01, **settings)


def test_momentum_belongs_to_sgd_alone():
    with pytest.raises(ConfigError, match="momentum and Nesterov are SGD's settings, not adam's"):
        TrainConfig(optimizer="adam", momentum=0.9)


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 1e-3), (0.9, True, 1e-3)])
def test_sgd_matches_torchs_definition(backend, momentum, nesterov, weight_decay):
    rng = numpy.random.default_rng(0)
    start = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(4)]
    parameter = Parameter(backend, start)
    optimizer = SGD(backend, [parameter], 0.1, momentum, nesterov, weight_decay)
    for g in grads:
        parameter.grad[...] = backend.asarray(g)
        optimizer.step()
    expected = torch_sgd_reference(start, grads, 0.1, momentum, nesterov, weight_decay)
    numpy.testing.assert_allclose(backend.to_numpy(parameter.value), expected, rtol=1e-13, atol=1e-15)


def test_cosine_schedule_runs_from_lr_to_zero():
    assert cosine_lr(0.1, 0, 100) == 0.1
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-18)
    assert cosine_lr(0.1, 25, 100) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2)


def test_optimiser_uses_the_scheduled_rate_per_step():
    backend = get_backend("numpy")
    parameter = Parameter(backend, numpy.zeros(1))
    optimizer = SGD(backend, [parameter], 1.0, schedule="cosine", total_steps=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.current_lr())
        parameter.grad[...] = -1.0  # so each step adds exactly its rate
        optimizer.step()
    assert rates == [cosine_lr(1.0, k, 4) for k in range(4)]
    assert parameter.value[0] == pytest.approx(sum(rates))


def test_nesterov_without_momentum_is_refused():
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(get_backend("numpy"), [], 0.1, nesterov=True)


class TorchSchedulers:
    """torch.optim.lr_scheduler's recursive rules (each get_lr from the rate before), stepped as
    a user would: LinearLR(start_factor=1/N, total_iters=N-1) each step through the warmup, then,
    as SequentialLR starts it at its milestone, CosineAnnealingLR(T_max) each step, or StepLR and
    ExponentialLR each epoch. Independent of schedules.Schedule's closed forms."""

    def __init__(self, name, lr, total_steps, steps_per_epoch, gamma, step_size, warmup_epochs):
        self.name, self.base, self.gamma, self.step_size = name, lr, gamma, step_size
        self.per_epoch, self.warmup = steps_per_epoch, warmup_epochs * steps_per_epoch
        self.t_max = max(total_steps - self.warmup, 1)

    def rates(self, steps):
        n, rate = self.warmup, self.base / max(self.warmup, 1)
        out = []
        for k in range(steps):
            if k < n:  # LinearLR: lr *= 1 + (end - start) / (total * start + (k - 1) * (end - start))
                if k > 0:
                    start, total = 1 / n, n - 1
                    rate *= 1 + (1 - start) / (total * start + (k - 1) * (1 - start))
            elif k == n:
                rate = self.base  # SequentialLR: the next scheduler starts from the base rate
            else:
                rate = self.next_rate(rate, k - n)
            out.append(rate)
        return out

    def next_rate(self, rate, j):
        """The rate of step j after the warmup, from the rate of step j - 1."""
        if self.name == "cosine":  # CosineAnnealingLR's recursive form, eta_min 0 (periodic past T_max)
            if (j - 1 - self.t_max) % (2 * self.t_max) == 0:
                return rate + self.base * (1 - math.cos(math.pi / self.t_max)) / 2
            return (1 + math.cos(math.pi * j / self.t_max)) / (1 + math.cos(math.pi * (j - 1) / self.t_max)) * rate
        epoch_starts = j % self.per_epoch == 0
        if self.name == "step" and epoch_starts and (j // self.per_epoch) % self.step_size == 0:
            return rate * self.gamma
        if self.name == "exponential" and epoch_starts:
            return rate * self.gamma
        return rate


@pytest.mark.parametrize("name", ["constant", "cosine", "step", "exponential"])
@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_each_schedule_follows_torchs_schedulers_at_every_step_and_past_the_end(name, warmup_epochs):
    steps_per_epoch, epochs = 7, 9
    settings = dict(total_steps=steps_per_epoch * epochs, steps_per_epoch=steps_per_epoch, gamma=0.5, step_size=3)
    schedule = Schedule(name, warmup_epochs=warmup_epochs, **settings)
    torch = TorchSchedulers(name, 0.2, warmup_epochs=warmup_epochs, **settings)
    steps = steps_per_epoch * (epochs + 3)  # three epochs past the end
    expected = torch.rates(steps)
    if name == "cosine":  # past the end xpnet holds 0, where torch's cosine climbs back (it is periodic)
        expected[settings["total_steps"] :] = [0.0] * (steps - settings["total_steps"])
    got = [schedule.lr_at(0.2, k) for k in range(steps)]
    numpy.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_the_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    schedule = Schedule("step", total_steps=100, steps_per_epoch=10, gamma=0.1, step_size=3)
    assert [schedule.lr_at(1.0, 10 * epoch) for epoch in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    warm = Schedule("exponential", total_steps=40, steps_per_epoch=10, gamma=0.5, warmup_epochs=1)
    assert [warm.lr_at(1.0, k) for k in (0, 4, 9, 10, 19, 20)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 0.5])


def test_a_trainer_runs_the_configs_schedule_by_its_epochs():
    from xpnet.data.synthetic import synthetic_splits
    from xpnet.nn.train import TrainConfig, Trainer

    config = TrainConfig(epochs=4, batch_size=50, lr=0.2, schedule="step", gamma=0.5, step_size=1, warmup_epochs=1)
    trainer = Trainer("numpy", synthetic_splits(n_train=200), config)  # 4 steps an epoch
    rates = [trainer.optimizer.lr_at(k) for k in range(16)]
    assert rates == pytest.approx([0.05, 0.1, 0.15, 0.2] + [0.2] * 4 + [0.1] * 4 + [0.05] * 4)
    losses = trainer.run_steps(4)  # the warmup's rates reach the steps
    assert trainer.optimizer.steps_taken == 4 and numpy.isfinite(losses).all()
