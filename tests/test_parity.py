"""Every op of every backend against an independent float64 reference on the same inputs:
the textbook formulas below, in plain NumPy, not the Backend class (whose NumPy instance is
itself under test here).

Tolerance rule: inputs are drawn in float64, rounded to the tested dtype, and the reference
is computed in float64 from those rounded values, so only the backend's arithmetic differs.
A result that sums K terms has, by the standard bound for floating-point dot products,
|computed - exact| <= K * u * sum|terms| (u = eps / 2; summation order only changes where
within this bound a result falls). So each comparison passes a reduction length K and the
sum of absolute terms ("magnitude"), and checks |got - ref| <= (K + 1) * eps * magnitude
(xpnet.verify.error_bound), the +1 for the final rounding to the dtype. float64 results must
also meet the project's promise of rtol 1e-10, with an absolute floor of 1e-10 times the op's
largest magnitude: a result that cancels to near zero (a softmax gradient p - 1 with p within
1e-6 of 1) carries its terms' rounding, and no summation order escapes that.
Ops that do no arithmetic (gather, ReLU, masks, argmax) must match exactly.
"""

import math

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpnet.backends import get_backend
from xpnet.backends.base import ACTIVATIONS, PRE_ACTIVATION
from xpnet.verify import activation_grad_carried, error_bound, forward_bound

DTYPES = ["float32", "float64"]
SHAPES = [  # (batch, n_in, n_out): batch 1, odd sizes, and the real layers of 784-200-10
    (1, 7, 13),
    (7, 13, 5),
    (512, 784, 200),
    (512, 200, 10),
]


def assert_within_bound(got, ref, dtype, reduction_length, magnitude):
    got = numpy.asarray(got, dtype=numpy.float64)
    excess = numpy.abs(got - ref) - error_bound(dtype, reduction_length, magnitude)
    assert got.shape == numpy.shape(ref)
    assert numpy.all(excess <= 0), f"worst error exceeds its bound by {excess.max():.3g}"
    if numpy.dtype(dtype) == numpy.float64:  # the project's promise for float64, checked on its own
        numpy.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * numpy.max(magnitude))


def draw(rng, shape, dtype, low=-1.0, high=1.0):
    """A float64 array whose values are exactly representable in dtype."""
    return rng.uniform(low, high, shape).astype(dtype).astype(numpy.float64)


def on(backend, array, dtype):
    return backend.asarray(array.astype(dtype))


def host(backend, array):
    return backend.to_numpy(array)


# -- the reference, in float64 ----------------------------------------------------------------
# Each activation as torch defines it (sigmoid as 1 / (1 + exp(-z)), where xpnet takes the tanh
# form), its derivative from its output, and a usable output to feed the backward pass.
def nonnegative_normal(rng, shape):
    return numpy.maximum(rng.standard_normal(shape), 0)


REFERENCE_ACTIVATIONS = {
    "identity": (lambda z: z, lambda g, y: g, None),
    "relu": (lambda z: numpy.maximum(z, 0), lambda g, y: g * (y > 0), nonnegative_normal),
    "tanh": (numpy.tanh, lambda g, y: g * (1 - y * y), lambda rng, shape: rng.uniform(-1, 1, shape)),
    "sigmoid": (
        lambda z: 1 / (1 + numpy.exp(-z)),
        lambda g, y: g * y * (1 - y),
        lambda rng, shape: rng.uniform(0, 1, shape),
    ),
    # torch.nn.GELU(approximate="none"): z * Phi(z); its derivative from z, the pre-activation
    # (wide draws reach the tail where 1 + erf cancels).
    "gelu": (
        lambda z: z * normal_cdf(z),
        lambda g, z: g * (normal_cdf(z) + z * numpy.exp(-z * z / 2) / math.sqrt(2 * math.pi)),
        lambda rng, shape: rng.normal(0, 4, shape),
    ),
}


def normal_cdf(z):
    """Phi(z) = (1 + erf(z / sqrt(2))) / 2, erf from Python's math module, in float64."""
    return numpy.vectorize(lambda v: (1 + math.erf(v / math.sqrt(2))) / 2)(z)


def reference_linear(x, W, b, activation):
    return REFERENCE_ACTIVATIONS[activation][0](x @ W.T + b)


def reference_linear_backward(x, W, grad_y, activation, saved):
    """The gradients of a layer whose activation gave output saved (its pre-activation for gelu)."""
    g = REFERENCE_ACTIVATIONS[activation][1](grad_y, saved)
    return [g.T @ x, g.sum(axis=0), g @ W]


def reference_softmax_cross_entropy(logits, labels):
    rows = numpy.arange(len(labels))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = numpy.log(numpy.exp(shifted).sum(axis=1))
    grad = numpy.exp(shifted - log_norm[:, None])
    grad[rows, labels] -= 1
    return (log_norm - shifted[rows, labels]).mean(), grad / len(labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_forward(backend, dtype, shape, activation):
    batch, n_in, n_out = shape
    rng = numpy.random.default_rng(sum(shape))
    x, W, b = draw(rng, (batch, n_in), dtype), draw(rng, (n_out, n_in), dtype), draw(rng, n_out, dtype)
    got = backend.linear_forward(on(backend, x, dtype), on(backend, W, dtype), on(backend, b, dtype), activation)
    ref = reference_linear(x, W, b, activation)
    magnitude = numpy.abs(x) @ numpy.abs(W).T + numpy.abs(b)
    # The activation's own error (tanh's documented 2 ulp, sigmoid's one rounding more, gelu's
    # relative to |z|) is verify's.
    bound = forward_bound(activation, ref, magnitude, n_in + 1, x @ W.T + b)
    assert_within_bound(host(backend, got), ref, dtype, *bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_pre_out_receives_the_pre_activation_where_the_backward_pass_needs_it(backend, dtype, activation):
    """gelu's forward writes z = x @ W.T + b into pre_out, as an identity layer computes it; the
    others leave pre_out as it was."""
    rng = numpy.random.default_rng(5)
    x, W, b = draw(rng, (7, 13), dtype), draw(rng, (5, 13), dtype), draw(rng, 5, dtype)
    arguments = [on(backend, array, dtype) for array in (x, W, b)]
    pre_out = on(backend, numpy.full((7, 5), 3.0), dtype)
    backend.linear_forward(*arguments, activation, pre_out=pre_out)
    z = host(backend, backend.linear_forward(*arguments, "identity"))
    numpy.testing.assert_array_equal(host(backend, pre_out), z if activation in PRE_ACTIVATION else 3.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("input_grad", [False, True])
def test_linear_backward(backend, dtype, shape, activation, input_grad):
    batch, n_in, n_out = shape
    rng = numpy.random.default_rng(sum(shape) + 1)
    x, W, grad_y = draw(rng, (batch, n_in), dtype), draw(rng, (n_out, n_in), dtype), draw(rng, (batch, n_out), dtype)
    make_saved = REFERENCE_ACTIVATIONS[activation][2]  # the output y, or for gelu the pre-activation z
    saved = None if make_saved is None else make_saved(rng, (batch, n_out)).astype(dtype).astype(numpy.float64)

    grad_x = backend.empty((batch, n_in), dtype) if input_grad else None
    on_backend = None if saved is None else on(backend, saved, dtype)
    grads = backend.linear_backward(
        on(backend, x, dtype),
        on(backend, W, dtype),
        on(backend, grad_y, dtype),
        grad_x=grad_x,
        activation=activation,
        **{"pre_activation" if activation in PRE_ACTIVATION else "output": on_backend},
    )
    got = [host(backend, a) for a in grads if a is not None]
    ref = reference_linear_backward(x, W, grad_y, activation, saved)
    # g's own roundings (none for a mask) and their size, then the sums over it.
    roundings, size = activation_grad_carried(activation, grad_y, saved)
    magnitudes = [size.T @ numpy.abs(x), size.sum(axis=0), size @ numpy.abs(W)]
    lengths = [batch + roundings, batch + roundings, n_out + roundings]
    for g, r, m, k in zip(got, ref, magnitudes, lengths):
        assert_within_bound(g, r, dtype, k, m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_its_backward_are_exact(backend, dtype):
    rng = numpy.random.default_rng(2)
    z, grad = draw(rng, (7, 13), dtype), draw(rng, (7, 13), dtype)
    a = host(backend, backend.relu(on(backend, z, dtype)))
    numpy.testing.assert_array_equal(a, numpy.maximum(z, 0))
    got = backend.relu_backward(on(backend, a, dtype), on(backend, grad, dtype))
    numpy.testing.assert_array_equal(host(backend, got), grad * (z > 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, classes", [(1, 10), (7, 13), (512, 10)])
def test_softmax_cross_entropy(backend, dtype, batch, classes):
    rng = numpy.random.default_rng(batch)
    logits = draw(rng, (batch, classes), dtype, -20, 20)
    labels = rng.integers(0, classes, batch)
    loss, grad = backend.softmax_cross_entropy(on(backend, logits, dtype), backend.asarray(labels))
    ref_loss, ref_grad = reference_softmax_cross_entropy(logits, labels)
    # Each probability is exp(shifted) / (sum of `classes` exps): about classes + 3 roundings
    # relative to itself; the loss sums batch terms each of size |log norm| + |shifted label|.
    shifted = logits - logits.max(axis=1, keepdims=True)
    per_row = numpy.log(numpy.exp(shifted).sum(axis=1)) + numpy.abs(shifted[numpy.arange(batch), labels])
    assert_within_bound(float(host(backend, loss)), ref_loss, dtype, batch + classes + 3, per_row.mean())
    assert_within_bound(host(backend, grad), ref_grad, dtype, classes + 3, numpy.abs(ref_grad) + 1.0 / batch)


SGD_SETTINGS = [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 5e-4)]


def assert_sgd_step(backend, dtype, before, after, lr, momentum, nesterov, weight_decay):
    """after (param, grad, velocity on the backend) is torch.optim.SGD's step from before (host
    float64 arrays), within the bounds of its terms' magnitudes (about 6 roundings)."""
    param, grad, velocity = before
    g = grad + weight_decay * param
    g_size = numpy.abs(grad) + weight_decay * numpy.abs(param)
    step, step_size = g, g_size
    if momentum:
        v = momentum * velocity + g
        v_size = momentum * numpy.abs(velocity) + g_size
        assert_within_bound(host(backend, after[2]), v, dtype, 3, v_size)
        step, step_size = (g + momentum * v, g_size + momentum * v_size) if nesterov else (v, v_size)
    assert_within_bound(host(backend, after[0]), param - lr * step, dtype, 6, numpy.abs(param) + lr * step_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, nesterov, weight_decay", SGD_SETTINGS)
def test_sgd_update(backend, dtype, momentum, nesterov, weight_decay):
    rng = numpy.random.default_rng(3)
    before = [draw(rng, (200, 784), dtype) for _ in range(3)]
    after = [on(backend, a, dtype) for a in before]
    velocity = after[2] if momentum else None
    backend.sgd_update(after[0], after[1], 0.0512, velocity, momentum, nesterov, weight_decay)
    assert_sgd_step(backend, dtype, before, after, 0.0512, momentum, nesterov, weight_decay)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, nesterov, weight_decay", SGD_SETTINGS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "one-strided"])
def test_sgd_update_all(backend, dtype, momentum, nesterov, weight_decay, strided):
    """A model's arrays updated at once (CuPy: one kernel; with a strided one among them, one
    kernel per array) as sgd_update updates each."""
    rng = numpy.random.default_rng(5)
    shapes = [(200, 784), (200,), (10, 200), (10,)]
    before = [[draw(rng, shape, dtype) for _ in range(3)] for shape in shapes]
    after = [[on(backend, a, dtype) for a in arrays] for arrays in before]
    if strided:  # the third param as the transpose of a (200, 10) array
        after[2][0] = on(backend, numpy.ascontiguousarray(before[2][0].T), dtype).T
    params, grads, velocities = ([arrays[k] for arrays in after] for k in range(3))
    backend.sgd_update_all(params, grads, 0.0512, velocities if momentum else None, momentum, nesterov, weight_decay)
    for start, end in zip(before, after):
        assert_sgd_step(backend, dtype, start, end, 0.0512, momentum, nesterov, weight_decay)


@pytest.mark.parametrize("dtype", DTYPES)
def test_take_rows_and_count_correct_are_exact(backend, dtype):
    rng = numpy.random.default_rng(4)
    source, labels = draw(rng, (50, 13), dtype), rng.integers(0, 13, 50)
    indices = rng.permutation(50)[:17]
    rows = backend.take_rows(on(backend, source, dtype), backend.asarray(indices))
    numpy.testing.assert_array_equal(host(backend, rows), source[indices])
    out = backend.empty((17,), backend.asarray(labels).dtype)
    numpy.testing.assert_array_equal(
        host(backend, backend.take_rows(backend.asarray(labels), backend.asarray(indices), out)), labels[indices]
    )
    correct = backend.count_correct(on(backend, source, dtype), backend.asarray(labels))
    assert int(host(backend, correct)) == int((source.argmax(axis=1) == labels).sum())


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 40), n_in=st.integers(1, 40), n_out=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_linear_round_trip_any_shape(batch, n_in, n_out, seed):
    """Random shapes through every CPU backend's forward and backward, in float32."""
    rng = numpy.random.default_rng(seed)
    x, W, b = draw(rng, (batch, n_in), "float32"), draw(rng, (n_out, n_in), "float32"), draw(rng, n_out, "float32")
    grad_y = draw(rng, (batch, n_out), "float32")
    for name in ["numpy", "numba"]:
        backend = get_backend(name)
        y = backend.linear_forward(x.astype("float32"), W.astype("float32"), b.astype("float32"), "relu")
        ref_y = reference_linear(x, W, b, "relu")
        assert_within_bound(y, ref_y, "float32", n_in + 1, numpy.abs(x) @ numpy.abs(W).T + numpy.abs(b))
        grad_W, _, _ = backend.linear_backward(
            x.astype("float32"), W.astype("float32"), grad_y.astype("float32"), activation="relu", output=y
        )
        masked = numpy.abs(grad_y) * (ref_y > 0)
        assert_within_bound(grad_W, (grad_y * (ref_y > 0)).T @ x, "float32", batch, masked.T @ numpy.abs(x))
