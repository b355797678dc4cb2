"""The Numba backend's compiled training loop: many steps per call, no Python between them.

The reference path runs a step as about fifteen backend calls from the layers, each a trip
through Python and its argument checks; at batch 1 that is most of a step. Here the whole
loop (gather, forward, loss, backward, update, the step's loss stored) is one @njit function
built from the backend's own kernels (_take_rows, _add_bias_relu, _softmax_cross_entropy,
_mask_and_sum_rows, _sgd_update) and from the model's structure: any depth, both dtypes, every
optimiser option. The math is not written a second time.

The products call the BLAS NumPy itself uses (its bundled ILP64 OpenBLAS) through ctypes,
with the routine numpy.matmul picks (gemv for a single row, else gemm) and the same
arguments. Measured on the 2-core machine they run as fast as NumPy's and give the same bits,
where numba's own np.dot (through SciPy's OpenBLAS) was 5-15% slower at batch 128 and 512.
So a compiled step equals this backend's op-by-op reference step exactly, which
tests/test_compiled_steps.py checks. Where NumPy's BLAS cannot be found there is no compiled
path, and the trainer runs the reference loop.

What the loop trusts, since nothing inside it checks: CompiledSteps makes every buffer from
the model's own sizes, checks the labels once against the classes, and is handed the
trainer's order, a permutation of the rows.
"""

import ctypes
import importlib

import numpy
from numba import njit

from xpnet.backends.numba_backend import (
    _add_bias_relu,
    _mask_and_sum_rows,
    _sgd_update,
    _softmax_cross_entropy,
    _take_rows,
)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def numpy_blas():
    """NumPy's own sgemm, dgemm, sgemv, dgemv (ILP64 CBLAS), typed for ctypes; or None."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            library = ctypes.CDLL(importlib.import_module(module).__file__)  # dlsym searches its BLAS too
        except (ImportError, OSError):
            continue
        for pattern in ("scipy_cblas_{}64_", "cblas_{}64_"):
            names = [pattern.format(name) for name in ("sgemm", "dgemm", "sgemv", "dgemv")]
            if all(hasattr(library, name) for name in names):
                return _typed([getattr(library, name) for name in names])
    return None


def _typed(routines):
    """sgemm, dgemm, sgemv, dgemv with their CBLAS signatures (64-bit sizes: ILP64)."""
    flag, size, pointer = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    for routine, real in zip(routines[:2], (ctypes.c_float, ctypes.c_double)):
        # order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
        routine.argtypes = [flag, flag, flag, size, size, size, real, pointer, size, pointer, size, real, pointer, size]
    for routine, real in zip(routines[2:], (ctypes.c_float, ctypes.c_double)):
        # order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy
        routine.argtypes = [flag, flag, size, size, real, pointer, size, pointer, size, real, pointer, size]
    for routine in routines:
        routine.restype = None
    return routines


BLAS = numpy_blas()
if BLAS is not None:
    _sgemm, _dgemm, _sgemv, _dgemv = BLAS

    @njit(nogil=True)  # not cached: the BLAS routines' addresses are this process's
    def _product(a, transpose_a, b, transpose_b, out):
        """out = op(a) @ op(b), op transposing when asked; all C-contiguous. One row is a gemv, as in numpy.matmul."""
        m, n = out.shape
        k = a.shape[0] if transpose_a else a.shape[1]
        single = out.itemsize == 4  # float32; else float64
        if m == 1 and not transpose_a:  # out's row = op(b).T @ a's row
            rows, cols = b.shape
            trans = NO_TRANS if transpose_b else TRANS
            if single:
                _sgemv(
                    ROW_MAJOR, trans, rows, cols, 1.0, b.ctypes.data, cols, a.ctypes.data, 1, 0.0, out.ctypes.data, 1
                )
            else:
                _dgemv(
                    ROW_MAJOR, trans, rows, cols, 1.0, b.ctypes.data, cols, a.ctypes.data, 1, 0.0, out.ctypes.data, 1
                )
            return
        ta, tb = TRANS if transpose_a else NO_TRANS, TRANS if transpose_b else NO_TRANS
        if single:
            _sgemm(ROW_MAJOR, ta, tb, m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0,
                   out.ctypes.data, n)  # fmt: skip
        else:
            _dgemm(ROW_MAJOR, ta, tb, m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0,
                   out.ctypes.data, n)  # fmt: skip

    @njit(nogil=True)  # not cached: it calls _product
    def _train_steps(x_all, y_all, order, first, n, batch_size, weights, biases, relu, grad_weights, grad_biases,
                     velocity_weights, velocity_biases, momentum, nesterov, weight_decay, lrs, activations,
                     grads_z, grads_x, grad_logits, labels, losses):  # fmt: skip
        """Steps first .. first + n - 1 of the epoch whose row order is `order`: each gathers its
        batch, runs every layer forward, the loss (stored in losses[k]), every layer backward,
        and the update with lrs[s]. activations[0] is the batch, activations[l + 1] layer l's output."""
        layers = len(weights)
        for s in range(n):
            k = first + s
            start = k * batch_size
            rows = min(batch_size, order.shape[0] - start)
            indices = order[start : start + rows]
            _take_rows(x_all, indices, activations[0][:rows])
            y = labels[:rows]
            for i in range(rows):
                y[i] = y_all[indices[i]]
            for layer in range(layers):
                out = activations[layer + 1][:rows]
                _product(activations[layer][:rows], False, weights[layer], True, out)  # y = x @ W.T
                _add_bias_relu(out, biases[layer], relu[layer])
            grad = grad_logits[:rows]
            losses[k] = _softmax_cross_entropy(activations[layers][:rows], y, grad)
            for layer in range(layers - 1, -1, -1):
                grad_z = grads_z[layer][:rows]
                _mask_and_sum_rows(grad, activations[layer + 1][:rows], relu[layer], grad_z, grad_biases[layer])
                if not relu[layer]:
                    grad_z = grad
                _product(grad_z, True, activations[layer][:rows], False, grad_weights[layer])  # grad_W = g.T @ x
                if layer > 0:
                    grad = grads_x[layer][:rows]
                    _product(grad_z, False, weights[layer], False, grad)  # grad_x = g @ W
            for layer in range(layers):
                _sgd_update(weights[layer].reshape(-1), grad_weights[layer].reshape(-1), lrs[s],
                            velocity_weights[layer].reshape(-1), momentum, nesterov, weight_decay)  # fmt: skip
                _sgd_update(biases[layer], grad_biases[layer], lrs[s], velocity_biases[layer], momentum, nesterov,
                            weight_decay)  # fmt: skip


class CompiledSteps:
    """A trainer's steps as one compiled call: run(order, first, n, lrs, losses) takes steps
    first .. first + n - 1 of the epoch with that row order, updating the model's parameters
    and the optimiser's velocities in place, with lrs[s] the learning rate of step s. It holds
    the model's own arrays: whoever changes a parameter writes into it (value[...] = ...), as
    checkpoints and verify do, and never swaps the array for another."""

    def __init__(self, backend, model, optimizer, train_x, train_y, batch_size):
        layers = model.net.layers
        dtype = model.dtype
        backend._check_range("labels", train_y, model.sizes[-1])
        self.data = (train_x, train_y)
        self.batch_size = batch_size
        params = optimizer.parameters
        velocities = [v if v is not None else p.value for p, v in zip(params, optimizer.velocities)]  # unread at 0
        self.model_arrays = (
            tuple(layer.W.value for layer in layers),
            tuple(layer.b.value for layer in layers),
            tuple(bool(layer.relu) for layer in layers),
            tuple(layer.W.grad for layer in layers),
            tuple(layer.b.grad for layer in layers),
            tuple(velocities[0::2]),
            tuple(velocities[1::2]),
            float(optimizer.momentum),
            bool(optimizer.nesterov),
            float(optimizer.weight_decay),
        )
        batch = min(batch_size, len(train_y))
        self.buffers = (
            tuple(numpy.empty((batch, size), dtype) for size in model.sizes),
            tuple(numpy.empty((batch, size), dtype) for size in model.sizes[1:]),
            tuple(numpy.empty((batch, size), dtype) for size in model.sizes[:-1]),
            numpy.empty((batch, model.sizes[-1]), dtype),
            numpy.empty(batch, train_y.dtype),
        )

    def run(self, order, first, n, lrs, losses):
        x_all, y_all = self.data
        _train_steps(x_all, y_all, order, first, n, self.batch_size, *self.model_arrays, lrs, *self.buffers, losses)

    def prepare(self, losses):
        """Compile the loop (a call of no steps): about a second, never inside a timed epoch."""
        self.run(numpy.zeros(0, numpy.int64), 0, 0, numpy.zeros(0), losses)
