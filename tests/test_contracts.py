"""The backend contracts of src/xpnet/backends/base.py, as behaviour, on every backend (numpy,
numba, the CuPy backend emulated on the CPU, and cupy itself where a GPU answers): inputs left
as they were, bad labels and indices refused the same way, strided views handled, copies in
and out, one rule for NaN. A range fault may surface at the call (CPU) or at the next read from
the device (GPU), so each check ends with a synchronize."""

import numpy
import pytest

from xpnet.errors import ArgumentError

DTYPES = ["float32", "float64"]


def arrays(backend, dtype, seed=0, batch=6, n_in=5, n_out=4):
    """Host arrays for every op, and the same arrays on the backend."""
    rng = numpy.random.default_rng(seed)
    host = {
        "x": rng.standard_normal((batch, n_in)),
        "W": rng.standard_normal((n_out, n_in)),
        "b": rng.standard_normal(n_out),
        "grad_y": rng.standard_normal((batch, n_out)),
        "relu_output": numpy.maximum(rng.standard_normal((batch, n_out)), 0),
        "logits": rng.standard_normal((batch, n_out)),
        "grad": rng.standard_normal((n_out, n_in)),
        "velocity": rng.standard_normal((n_out, n_in)),
    }
    host = {name: a.astype(dtype) for name, a in host.items()}
    host["labels"] = rng.integers(0, n_out, batch)
    host["indices"] = rng.integers(0, batch, 3)
    return host, {name: backend.asarray(a) for name, a in host.items()}


def every_op(backend, a):
    """Each op called once on the arrays a; the names of the arrays each one takes as inputs."""
    yield "take_rows", ["x", "indices"], lambda: backend.take_rows(a["x"], a["indices"])
    yield "linear_forward", ["x", "W", "b"], lambda: backend.linear_forward(a["x"], a["W"], a["b"], "relu")
    yield (
        "linear_backward",
        ["x", "W", "grad_y", "relu_output"],
        lambda: backend.linear_backward(
            a["x"],
            a["W"],
            a["grad_y"],
            grad_x=backend.empty(a["x"].shape, a["x"].dtype),
            activation="relu",
            output=a["relu_output"],
        ),
    )
    yield "relu", ["logits"], lambda: backend.relu(a["logits"])
    yield "relu_backward", ["relu_output", "grad_y"], lambda: backend.relu_backward(a["relu_output"], a["grad_y"])
    yield "softmax_cross_entropy", ["logits", "labels"], lambda: backend.softmax_cross_entropy(a["logits"], a["labels"])
    yield "count_correct", ["logits", "labels"], lambda: backend.count_correct(a["logits"], a["labels"])
    yield (
        "sgd_update",
        ["grad"],
        lambda: backend.sgd_update(a["W"], a["grad"], 0.1, a["velocity"], 0.9, True, 1e-3),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_op_writes_into_an_input_it_does_not_name_as_output(backend, dtype):
    host, on_backend = arrays(backend, dtype)
    for name, inputs, call in every_op(backend, on_backend):
        before = {k: backend.to_numpy(on_backend[k]) for k in inputs}
        call()
        backend.synchronize()
        for k in inputs:
            numpy.testing.assert_array_equal(backend.to_numpy(on_backend[k]), before[k], err_msg=f"{name} changed {k}")


BAD_LABELS = [10, 11, -1, 10**6]


@pytest.mark.parametrize("bad", BAD_LABELS)
@pytest.mark.parametrize("op", ["softmax_cross_entropy", "count_correct"])
def test_labels_outside_the_classes_raise_the_same_error_everywhere(backend, op, bad):
    logits = backend.asarray(numpy.zeros((4, 10), numpy.float32))
    labels = backend.asarray(numpy.array([1, bad, 2, 3]))
    with pytest.raises(ArgumentError, match=r"labels must lie in \[0, 10\)"):
        getattr(backend, op)(logits, labels)
        backend.synchronize()
    good = getattr(backend, op)(logits, backend.asarray(numpy.array([1, 9, 2, 3])))  # the backend still works
    assert numpy.isfinite(float(backend.to_numpy(good[0] if isinstance(good, tuple) else good)))


@pytest.mark.parametrize("bad", [5, -1, 10**6])
def test_row_indices_outside_the_source_raise_the_same_error_everywhere(backend, bad):
    source = backend.asarray(numpy.arange(10.0).reshape(5, 2))
    with pytest.raises(ArgumentError, match=r"indices must lie in \[0, 5\)"):
        backend.take_rows(source, backend.asarray(numpy.array([0, bad])))
        backend.synchronize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_updates_a_transposed_view_in_place(backend, dtype, momentum):
    """W.T is a strided view of W: updating it must update W (never a copy of it)."""
    host, a = arrays(backend, dtype)
    W, grad_T, velocity_T = a["W"], a["grad"].T.copy(), a["velocity"].T.copy()
    backend.sgd_update(W.T, grad_T, 0.1, velocity_T if momentum else None, momentum, False, 0.0)
    expected_velocity = momentum * host["velocity"] + host["grad"]
    expected = host["W"] - 0.1 * expected_velocity
    rtol = 8 * numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(backend.to_numpy(W), expected, rtol=rtol, atol=rtol)
    if momentum:
        numpy.testing.assert_allclose(backend.to_numpy(velocity_T).T, expected_velocity, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_take_rows_into_a_strided_out_writes_every_row(backend, dtype):
    source = backend.asarray(numpy.arange(5 * 2 * 3, dtype=dtype).reshape(5, 2, 3))
    indices = backend.asarray(numpy.array([4, 0, 2]))
    out = backend.asarray(numpy.full((3, 2, 4), -1, dtype))[:, :, :3]  # rows with gaps: no flat view of them exists
    backend.take_rows(source, indices, out=out)
    expected = numpy.arange(30, dtype=dtype).reshape(5, 2, 3)[[4, 0, 2]]
    numpy.testing.assert_array_equal(backend.to_numpy(out), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_outputs_of_the_fused_ops_give_the_contiguous_results(backend, dtype):
    """Every array of the backward pass and the loss as a strided view: the same numbers."""
    host, a = arrays(backend, dtype)
    strided = {k: backend.asarray(numpy.repeat(v, 2, axis=-1))[..., ::2] for k, v in host.items() if v.ndim == 2}
    for k in ("grad_y", "relu_output", "logits"):
        assert not strided[k].flags.c_contiguous
    expected = backend.linear_backward(a["x"], a["W"], a["grad_y"], activation="relu", output=a["relu_output"])
    grad_z = backend.asarray(numpy.zeros((6, 8), dtype))[:, ::2]
    grad_b = backend.asarray(numpy.zeros(8, dtype))[::2]
    got = backend.linear_backward(
        strided["x"],
        strided["W"],
        strided["grad_y"],
        grad_b=grad_b,
        activation="relu",
        output=strided["relu_output"],
        grad_z=grad_z,
    )
    for e, g in zip(expected[:2], got[:2]):
        numpy.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(e))
    numpy.testing.assert_array_equal(backend.to_numpy(grad_z), host["grad_y"] * (host["relu_output"] > 0))
    loss, grad = backend.softmax_cross_entropy(a["logits"], a["labels"])
    grad_out = backend.asarray(numpy.zeros((6, 8), dtype))[:, ::2]
    strided_loss, _ = backend.softmax_cross_entropy(strided["logits"], a["labels"], grad_out=grad_out)
    assert float(backend.to_numpy(strided_loss)) == float(backend.to_numpy(loss))
    numpy.testing.assert_array_equal(backend.to_numpy(grad_out), backend.to_numpy(grad))


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda bk, a: bk.linear_forward(a["x"], a["W"], bk.asarray(numpy.zeros(3, numpy.float32))),
            r"b must have shape \(4\)",
        ),
        (
            lambda bk, a: bk.linear_forward(a["x"], a["W"], a["b"], out=bk.empty((6, 3), "float32")),
            "out must have shape",
        ),
        (lambda bk, a: bk.linear_forward(a["x"].T, a["W"], a["b"]), r"x must have shape \(\*, 5\)"),
        (lambda bk, a: bk.linear_backward(a["x"], a["W"], a["grad_y"][:3]), r"grad_y must have shape \(6, 4\)"),
        (lambda bk, a: bk.sgd_update(a["W"], a["grad"][:2], 0.1), r"grad must have shape \(4, 5\)"),
        (lambda bk, a: bk.sgd_update(a["W"], a["grad"], 0.1, None, 0.9), "momentum needs a velocity buffer"),
        (lambda bk, a: bk.softmax_cross_entropy(a["logits"], a["labels"][:2]), r"labels must have shape \(6\)"),
        (lambda bk, a: bk.softmax_cross_entropy(a["logits"], a["logits"][:, 0]), "labels must hold integers"),
        (lambda bk, a: bk.take_rows(a["x"], a["indices"], out=bk.empty((2, 5), "float32")), "out must have shape"),
    ],
)
def test_shapes_that_do_not_fit_are_refused_before_any_kernel_runs(backend, call, message):
    _, a = arrays(backend, "float32")
    with pytest.raises(ArgumentError, match=message):
        call(backend, a)


def test_mixed_dtypes_are_refused_not_cast(backend):
    _, a32 = arrays(backend, "float32")
    _, a64 = arrays(backend, "float64")
    with pytest.raises(ArgumentError, match="W is float64 but|x is float32 but"):
        backend.linear_forward(a32["x"], a64["W"], a64["b"])
    with pytest.raises(ArgumentError, match="grad is float64 but the op's other arrays are float32"):
        backend.sgd_update(a32["W"], a64["grad"], 0.1)
    with pytest.raises(ArgumentError, match="must be float32 or float64, got float16"):
        backend.relu(backend.asarray(numpy.zeros(3, numpy.float16)))


def test_a_row_holding_nan_is_never_correct(backend):
    logits = numpy.eye(4, dtype=numpy.float32)  # row i predicts class i
    logits[1, 3] = numpy.nan  # NaN elsewhere than the prediction
    logits[2, 2] = numpy.nan  # NaN at the label itself
    logits[3, 0] = numpy.nan  # NaN in the first column, where a scan starts
    labels = numpy.arange(4)
    correct = backend.count_correct(backend.asarray(logits), backend.asarray(labels))
    assert int(backend.to_numpy(correct)) == 1


def test_a_tie_goes_to_the_first_largest_logit(backend):
    logits = numpy.array([[1, 3, 3], [2, 2, 2], [0, 5, 5], [-1, -1, -2]], numpy.float32)
    labels = logits.argmax(axis=1)  # 1, 0, 1, 0: the first of the tied; the last would match none
    correct = backend.count_correct(backend.asarray(logits), backend.asarray(labels))
    assert int(backend.to_numpy(correct)) == 4


def test_asarray_and_to_numpy_always_copy(backend):
    host = numpy.arange(6.0).reshape(2, 3)
    on_backend = backend.asarray(host)
    host[0, 0] = 100.0
    back = backend.to_numpy(on_backend)
    assert back[0, 0] == 0.0  # the backend's array did not see the write to host
    back[0, 1] = 100.0
    assert backend.to_numpy(on_backend)[0, 1] == 1.0  # nor the write to what to_numpy gave
    assert type(back) is numpy.ndarray
