"""The optimiser's rule and schedule against an independent float64 implementation."""

import math

import numpy
import pytest

from xpnet.backends import get_backend
from xpnet.nn.layers import Parameter
from xpnet.nn.optim import SGD, cosine_lr


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
