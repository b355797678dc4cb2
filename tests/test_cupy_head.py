"""The CuPy step's fused output layer and loss (src/xpnet/backends/cupy_head.py), run on the CPU
emulation of CuPy (tests/cuda_host.py): each result against float64 arithmetic on the kernels'
own inputs within `xpnet verify`'s one-op bounds, labels outside the classes, the checks at the
boundary, and mutations of the kernels (a barrier, a bounds guard) that these tests must catch."""

import numpy
import pytest

from tests.cuda_host import CXX, EmulatedCupyBackend, RawModule
from xpnet.backends import cupy_backend, cupy_head
from xpnet.backends.numpy_backend import NumpyBackend
from xpnet.errors import ArgumentError
from xpnet.verify import (
    ACTIVATION_FUNCTIONS,
    activation_grad,
    activation_grad_bound,
    activation_grad_carried,
    compare,
    forward_bound,
    loss_magnitude,
)

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy kernels on the CPU")

# (rows, width, classes, hidden activation): a partial last slice of rows and a partial last tile
# of columns; a width whose output bias column starts a tile of its own; one class; the most
# classes; one row; each activation the head takes (identity with one gradient array and two).
SHAPES = [
    (130, 45, 10, "relu"),
    (64, 31, 1, "tanh"),
    (64, 200, 16, "sigmoid"),
    (1, 3, 2, "identity"),
    (200, 64, 10, "relu"),
    (70, 20, 3, "identity"),
]


def head_arrays(xp, rows, width, classes, dtype, activation="relu", seed=0):
    """Random hidden products, parameters and labels in range, and every output filled with NaN
    (for identity, grad_hidden_z is grad_hidden, as the graphs pass it; the 1-row case passes two)."""
    rng = numpy.random.default_rng(seed)
    random = lambda *shape: xp.asarray(rng.standard_normal(shape).astype(dtype))  # noqa: E731
    empty = lambda *shape: xp.asarray(numpy.full(shape, numpy.nan, dtype))  # noqa: E731
    labels = xp.asarray(rng.integers(0, classes, rows))
    grad_hidden = empty(rows, width)
    grad_hidden_z = grad_hidden if activation == "identity" and rows > 1 else empty(rows, width)
    return cupy_head.HeadArrays(
        hidden=random(rows, width), hidden_b=random(width), activation=activation, W=random(classes, width),
        b=random(classes), labels=labels, logits=empty(rows, classes), grad_logits=empty(rows, classes),
        grad_hidden=grad_hidden, grad_hidden_z=grad_hidden_z, grad_hidden_b=empty(width), grad_W=empty(classes, width),
        grad_b=empty(classes), loss=empty(1),
    )  # fmt: skip


def run_head(
    source_block=None, source_raw=None, shape=(130, 45, 10, "relu"), dtype=numpy.float64, labels=None, reverse=False
):
    """The head's three kernels on random arrays, from the backend's sources or mutated ones, a
    block's threads in thread order or in reverse (tests/cuda_host.py); the arrays after, and
    the hidden products before."""
    backend = EmulatedCupyBackend()
    rows, width, classes, activation = shape
    head = head_arrays(backend.xp, rows, width, classes, dtype, activation)
    if labels is not None:
        head.labels[...] = labels
    products = numpy.array(head.hidden, numpy.float64)
    scratch = cupy_head.workspace(backend.xp, rows, width, classes, dtype)
    if source_block is not None or reverse:
        source = source_block or cupy_backend.BLOCK_SOURCE
        block = RawModule(source, ("--std=c++14",), cupy_backend.BLOCK_KERNELS, reverse_threads=reverse)
        backend._launch_blocks = lambda name, blocks, threads, args, dtype: block.get_function(
            cupy_backend._instance(name, dtype)
        )((blocks,), (threads,), args)
    if source_raw is not None:
        raw = RawModule(source_raw, ("--std=c++14",), cupy_backend.RAW_KERNELS)
        backend._launch = lambda name, n, args, dtype=None: raw.get_function(cupy_backend._instance(name, dtype))(
            (-(-n // 128),), (128,), args
        )
    backend._fused_head(head, scratch)
    return head, products


def host(array):
    return numpy.asarray(array, numpy.float64)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_each_result_of_the_head_is_within_its_one_op_bound(shape, dtype):
    """Each result against float64 arithmetic on the kernels' own inputs to it, within the bounds
    `xpnet verify` derives for the op it stands for."""
    head, products = run_head(shape=shape, dtype=dtype)
    rows, width, classes, activation = shape
    hidden_b, W, b, labels = host(head.hidden_b), host(head.W), host(head.b), numpy.asarray(head.labels)
    y, logits, grad = host(head.hidden), host(head.logits), host(head.grad_logits)
    grad_y, grad_z = host(head.grad_hidden), host(head.grad_hidden_z)
    expected_y = ACTIVATION_FUNCTIONS[activation][0](products + hidden_b)
    loss_ref, grad_ref = NumpyBackend().softmax_cross_entropy(logits, labels)  # on the head's own logits
    roundings, grad_z_size = activation_grad_carried(activation, grad_y, y)
    checks = {
        "hidden output": (y, expected_y, *forward_bound(activation, expected_y, abs(products) + abs(hidden_b), 1)),
        "logits": (logits, y @ W.T + b, width + 1, abs(y) @ abs(W).T + abs(b)),
        "loss": (host(head.loss)[0], loss_ref, rows + classes + 3, loss_magnitude(logits, labels)),
        "grad_logits": (grad, grad_ref, classes + 3, abs(grad_ref) + 1.0 / rows),
        "grad_hidden": (grad_y, grad @ W, classes, abs(grad) @ abs(W)),
        "grad_hidden_z": (
            grad_z,
            activation_grad(activation, grad_y, y),
            *activation_grad_bound(activation, grad_y, y),
        ),
        "grad_hidden_b": (host(head.grad_hidden_b), grad_z.sum(axis=0), rows + roundings, grad_z_size.sum(axis=0)),
        "grad_W": (host(head.grad_W), grad.T @ y, rows, abs(grad).T @ abs(y)),
        "grad_b": (host(head.grad_b), grad.sum(axis=0), rows, abs(grad).sum(axis=0)),
    }
    failed = {}
    for op, (got, expected, length, magnitude) in checks.items():
        check = compare(0, op, "cupy-emulated", got, expected, dtype, length, magnitude)
        if not check.passed:
            failed[op] = check.bound_used
    assert failed == {}


def test_a_label_outside_the_classes_gives_its_row_a_nan_loss_and_touches_nothing_else():
    """The emulation checks that no array is written outside its bytes; the other rows' hidden
    gradients are their own, and the loss, a mean over every row, is NaN."""
    labels = numpy.arange(130) % 10
    labels[[3, 77]] = -1, 10
    head, _ = run_head(labels=labels)
    good = numpy.ones(130, bool)
    good[[3, 77]] = False
    assert numpy.isnan(host(head.loss)[0])
    assert numpy.isnan(host(head.grad_logits)[~good]).all() and numpy.isfinite(host(head.grad_logits)[good]).all()
    grad = host(head.grad_logits)[good]
    numpy.testing.assert_allclose(host(head.grad_hidden)[good], grad @ host(head.W), rtol=1e-12, atol=1e-15)


def test_the_head_gives_the_same_bits_whichever_thread_runs_first():
    (forward, _), (reverse, _) = run_head(), run_head(reverse=True)
    for name, got in reverse._asdict().items():
        numpy.testing.assert_array_equal(got, getattr(forward, name), err_msg=name)


ROWS_BARRIER = "    __syncthreads();\n    T* grad_y = grad_hidden + i * width;"
SUMS_GUARD = "    if (j <= width) {\n        for (int c = lane; c <= classes; c += HEAD_LANES) {"


def test_without_the_barrier_before_the_hidden_gradient_the_head_reads_a_stale_gradient():
    """Thread 0 writes the logits' gradient that every thread then reads: the higher threads, run
    first, read it before it is written."""
    assert cupy_backend.BLOCK_SOURCE.count(ROWS_BARRIER) == 1
    source = cupy_backend.BLOCK_SOURCE.replace(ROWS_BARRIER, ROWS_BARRIER.split("\n", 1)[1])
    head, _ = run_head(source_block=source, reverse=True)
    expected = host(head.grad_logits) @ host(head.W)
    assert numpy.max(numpy.abs(host(head.grad_hidden) - expected)) > 1e-3 * numpy.max(numpy.abs(expected))


def test_without_its_bounds_guard_the_slice_sums_write_past_their_array():
    assert cupy_backend.BLOCK_SOURCE.count(SUMS_GUARD) == 1
    source = cupy_backend.BLOCK_SOURCE.replace(SUMS_GUARD, "    {\n" + SUMS_GUARD.split("\n", 1)[1])
    with pytest.raises(AssertionError, match="head_slice_sums.*wrote outside the argument"):
        run_head(source_block=source, shape=(64, 40, 10, "relu"))  # one slice; its columns 32-63 past 41


def test_without_its_bounds_guard_the_finish_writes_past_the_hidden_bias_gradient():
    """The hidden bias's row of sums has one slot more than the bias (the output bias's column)."""
    guard = "else if (j < width) grad_hidden_b[j] = total;"
    assert cupy_backend.RAW_SOURCE.count(guard) == 1
    with pytest.raises(AssertionError, match="head_finish.*argument 5, wrote outside the argument"):
        run_head(source_raw=cupy_backend.RAW_SOURCE.replace(guard, "else grad_hidden_b[j] = total;"))


def bad_arrays(change):
    """The arrays of a small head with one changed: change(head, scratch) -> (head, scratch)."""
    xp = EmulatedCupyBackend().xp
    head = head_arrays(xp, 10, 6, 3, numpy.float32)
    return change(head, cupy_head.workspace(xp, 10, 6, 3, numpy.float32))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, s: (h._replace(W=h.W[:, :5]), s), "W must be a contiguous float32 array of shape \\(3, 6\\)"),
        (lambda h, s: (h._replace(logits=h.logits.astype(numpy.float64)), s), "logits must be .* float32"),
        (lambda h, s: (h._replace(labels=h.labels.astype(numpy.int32)), s), "labels must be .* int64"),
        (lambda h, s: (h._replace(grad_hidden=h.grad_hidden.T.copy().T), s), "got a non-contiguous float32"),
        (lambda h, s: (h._replace(hidden_b=h.b), s), "hidden_b must be .* shape \\(6,\\)"),
        (
            lambda h, s: (h._replace(activation="gelu"), s),
            "takes the activations identity, relu, tanh, sigmoid, not 'gelu'",
        ),
        (lambda h, s: (h, s._replace(sums=s.sums[:, :3])), "sums must be .* shape \\(1, 4, 7\\)"),
        (lambda h, s: (h._replace(hidden=h.hidden[:0]), s), "hidden of one row or more, got shapes \\(0, 6\\)"),
        (lambda h, s: (h._replace(W=h.W[0]), s), "takes 2-D hidden and W, .* and \\(6,\\)"),
        (lambda h, s: (h._replace(loss=h.b), s), "loss must be .* shape \\(1,\\)"),
    ],
    ids=[
        "W's width",
        "logits' dtype",
        "labels' dtype",
        "strided",
        "hidden bias",
        "gelu",
        "scratch",
        "no rows",
        "1-D W",
        "loss",
    ],
)
def test_arrays_the_kernels_would_index_wrongly_are_refused_at_the_boundary(change, message):
    head, scratch = bad_arrays(change)
    with pytest.raises(ArgumentError, match=message):
        EmulatedCupyBackend()._fused_head(head, scratch)


def test_more_classes_than_a_thread_keeps_sums_for_are_refused():
    xp = EmulatedCupyBackend().xp
    head = head_arrays(xp, 4, 6, 17, numpy.float64)
    with pytest.raises(ArgumentError, match="the fused head takes 1 to 16 classes, got W of shape \\(17, 6\\)"):
        EmulatedCupyBackend()._fused_head(head, cupy_head.workspace(xp, 4, 6, 17, numpy.float64))


@pytest.mark.parametrize(
    "sizes, activation, problem",
    [
        ((784, 200, 10), "relu", None),
        ((784, 800, 800, 16), "tanh", None),
        ((784, 10), "relu", "it fuses an output layer after a hidden layer"),
        ((784, 200, 17), "relu", "it fuses output layers of at most 16 classes, not 17"),
        ((784, 200, 10), "gelu", "it fuses hidden activations whose output gives their derivative, not gelu"),
    ],
)
def test_the_head_says_which_models_it_fuses(sizes, activation, problem):
    assert cupy_head.head_problem(sizes, activation) == problem
