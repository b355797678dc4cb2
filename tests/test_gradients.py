"""Every backward pass against central finite differences of its forward, in float64.

Relative error ||analytic - numeric|| / (||analytic|| + ||numeric||) must stay below 1e-6.
Central differences with eps = 1e-6 in float64 carry an absolute error of about
eps^2 + 1e-16 / eps ~ 1e-10 times the loss's scale, so the error is measured against the
whole gradient's norm: element by element, a component of 1e-9 would drown in that noise.
A wrong gradient (a dropped term, a missing mask) is off by far more than 1e-6.
"""

import numpy
import pytest

from xpnet.backends.base import ACTIVATIONS
from xpnet.nn.layers import Linear, ReLU, Sequential
from xpnet.nn.loss import SoftmaxCrossEntropy
from xpnet.nn.model import MLP

EPS = 1e-6


def relative_error(analytic, numeric):
    scale = numpy.linalg.norm(analytic) + numpy.linalg.norm(numeric)
    return float(numpy.linalg.norm(analytic - numeric) / max(scale, 1e-300))


def numeric_gradient(backend, loss_fn, array):
    """d loss / d array by central differences, perturbing the backend array in place."""
    grad = numpy.zeros(array.shape)
    for index in numpy.ndindex(*array.shape):
        original = float(backend.to_numpy(array[index]))
        array[index] = original + EPS
        plus = loss_fn()
        array[index] = original - EPS
        minus = loss_fn()
        array[index] = original
        grad[index] = (plus - minus) / (2 * EPS)
    return grad


def away_from_zero(rng, shape, margin=0.1):
    """Values with |v| >= margin: ReLU has no derivative at 0, so inputs must not sit there."""
    values = rng.uniform(margin, 2.0, shape)
    return values * rng.choice([-1.0, 1.0], shape)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_gradients(backend, activation):
    rng = numpy.random.default_rng(1)
    layer = Linear(backend, 7, 5, rng, "float64", activation)
    layer.b.value[...] = backend.asarray(rng.uniform(-0.5, 0.5, 5))
    x = backend.asarray(rng.standard_normal((4, 7)))
    weights = rng.standard_normal((4, 5))  # loss = sum(y * weights), so dL/dy = weights

    def loss():
        return float((backend.to_numpy(layer.forward(x)) * weights).sum())

    loss()
    grad_x = backend.to_numpy(layer.backward(backend.asarray(weights)))
    analytic = {"W": backend.to_numpy(layer.W.grad).copy(), "b": backend.to_numpy(layer.b.grad).copy()}
    assert relative_error(grad_x, numeric_gradient(backend, loss, x)) < 1e-6
    assert relative_error(analytic["W"], numeric_gradient(backend, loss, layer.W.value)) < 1e-6
    assert relative_error(analytic["b"], numeric_gradient(backend, loss, layer.b.value)) < 1e-6


def test_relu_gradient(backend):
    rng = numpy.random.default_rng(2)
    z = backend.asarray(away_from_zero(rng, (5, 6)))
    weights = rng.standard_normal((5, 6))
    relu = ReLU(backend)

    def loss():
        return float((backend.to_numpy(relu.forward(z)) * weights).sum())

    loss()
    analytic = backend.to_numpy(relu.backward(backend.asarray(weights)))
    assert relative_error(analytic, numeric_gradient(backend, loss, z)) < 1e-6


def test_softmax_cross_entropy_gradient(backend):
    rng = numpy.random.default_rng(3)
    logits = backend.asarray(rng.standard_normal((6, 10)) * 3)
    labels = backend.asarray(rng.integers(0, 10, 6))
    loss_fn = SoftmaxCrossEntropy(backend)

    def loss():
        return float(backend.to_numpy(loss_fn.forward(logits, labels)))

    loss()
    analytic = backend.to_numpy(loss_fn.backward()).copy()
    assert relative_error(analytic, numeric_gradient(backend, loss, logits)) < 1e-6


def test_two_hidden_layer_model_gradients(backend):
    rng = numpy.random.default_rng(4)
    model = MLP(backend, [6, 5, 4, 3], dtype="float64", rng=rng)
    for p in model.parameters():  # nonzero biases so their gradients are exercised
        p.value[...] = p.value + backend.asarray(rng.uniform(-0.3, 0.3, p.value.shape))
    x = backend.asarray(rng.standard_normal((8, 6)))
    labels = backend.asarray(rng.integers(0, 3, 8))
    loss_fn = SoftmaxCrossEntropy(backend)

    def loss():
        return float(backend.to_numpy(loss_fn.forward(model.forward(x), labels)))

    loss()
    model.backward(loss_fn.backward())
    analytic = [backend.to_numpy(p.grad).copy() for p in model.parameters()]
    for grad, p in zip(analytic, model.parameters()):
        assert relative_error(grad, numeric_gradient(backend, loss, p.value)) < 1e-6


def test_fused_relu_equals_linear_then_relu(backend):
    """Linear(activation="relu") is Linear followed by ReLU: same outputs, same gradients."""
    x_host = numpy.random.default_rng(5).standard_normal((9, 7))
    grad_host = numpy.random.default_rng(6).standard_normal((9, 4))
    fused = Linear(backend, 7, 4, numpy.random.default_rng(0), "float64", "relu")
    plain = Linear(backend, 7, 4, numpy.random.default_rng(0), "float64")
    chain = Sequential([plain, ReLU(backend)])
    x = backend.asarray(x_host)
    numpy.testing.assert_array_equal(backend.to_numpy(fused.forward(x)), backend.to_numpy(chain.forward(x)))
    grad_fused = backend.to_numpy(fused.backward(backend.asarray(grad_host)))
    grad_chain = backend.to_numpy(chain.backward(backend.asarray(grad_host)))
    numpy.testing.assert_allclose(grad_fused, grad_chain, rtol=1e-14)
    numpy.testing.assert_allclose(backend.to_numpy(fused.W.grad), backend.to_numpy(plain.W.grad), rtol=1e-14)
    numpy.testing.assert_allclose(backend.to_numpy(fused.b.grad), backend.to_numpy(plain.b.grad), rtol=1e-14)
