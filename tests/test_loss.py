import numpy
import pytest

from xpnet.nn.loss import SoftmaxCrossEntropy


def reference_loss_and_grad(logits, labels):
    """Float64 log-softmax by logaddexp.reduce, independent of the backends' max-subtraction."""
    log_norm = numpy.logaddexp.reduce(logits, axis=1)
    log_probs = logits - log_norm[:, None]
    n = len(labels)
    loss = -log_probs[numpy.arange(n), labels].mean()
    grad = numpy.exp(log_probs)
    grad[numpy.arange(n), labels] -= 1
    return loss, grad / n


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_stay_finite_with_the_right_gradient(backend, dtype, scale):
    rng = numpy.random.default_rng(0)
    logits = rng.choice([-1.0, 0.0, 1.0], (16, 10)) * scale
    labels = rng.integers(0, 10, 16)
    loss_fn = SoftmaxCrossEntropy(backend)
    loss = float(backend.to_numpy(loss_fn.forward(backend.asarray(logits, dtype), backend.asarray(labels))))
    grad = backend.to_numpy(loss_fn.backward())
    expected_loss, expected_grad = reference_loss_and_grad(logits, labels)
    assert numpy.isfinite(loss) and numpy.all(numpy.isfinite(grad))
    # Each result is a handful of roundings (exp, a sum of 10 terms, log, a division): within
    # (classes + 3) roundings of the dtype, relative to itself. The float64 reference adds its
    # own: its log-sum-exp of logits of size |scale| is off by about eps64 * |scale|, which
    # exp turns into that relative error of each probability. Gradients are at most 1 / n.
    roundings = 10 + 3
    tolerance = roundings * (numpy.finfo(dtype).eps + numpy.finfo(numpy.float64).eps * abs(scale))
    numpy.testing.assert_allclose(loss, expected_loss, rtol=tolerance)
    numpy.testing.assert_allclose(grad, expected_grad, rtol=tolerance, atol=tolerance / len(labels))
