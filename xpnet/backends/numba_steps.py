"""The Numba backend's compiled training loop: many steps per call, no Python between them.

The reference path runs a step as about fifteen backend calls from the layers, each a trip
through Python and its argument checks; at batch 1 that is most of a step. Here the whole
loop (gather, forward, loss, backward, update, the step's loss stored) is one @njit function
built from the backend's own kernels (_take_rows, _add_bias_relu, _softmax_cross_entropy,
_mask_and_sum_rows, _sgd_update) and from the model's structure: any depth, both dtypes, every
optimiser option. The math is not written a second time.

The products call the BLAS NumPy itself uses (its bundled ILP64 OpenBLAS) through ctypes:
numba's own np.dot (through SciPy's OpenBLAS) was 5-15% slower at batch 128 and 512. Owning
the calls buys two things the layer-by-layer path cannot do, each measured on the 2-core
machine (bench/README.md):

- The update is the gradient's product. Without momentum, W <- (1 - lr * decay) * W - lr * g.T @ x
  is one gemm with alpha = -lr and beta = 1 - lr * decay, so no gradient array is written
  and read back and no update pass runs; gemm with beta 1 also skips its zeroing pass. A layer
  is updated as soon as its backward pass is done, while its weights are in cache. With
  momentum the gradient is formed and _sgd_update applies it, as on the reference path.
- Below FEATURE_MAJOR_BELOW rows, layer outputs are kept feature-major (the transpose of a C
  array): OpenBLAS computes out.T = W @ x.T 2.6x faster than out = x @ W.T at batch 16 and
  1.3x at 64, while from 128 rows the strided elementwise passes over such outputs cost more
  than the product saves.

So a compiled step rounds differently from the reference step (the update in one rounding
instead of two, products in another blocking): `xpnet verify` checks each op of a compiled
step against float64 arithmetic within the same one-op bounds as the reference path, and the
loop is deterministic, so a run resumes bit for bit. On the fold path the layers' W.grad
arrays are not written. Where NumPy's BLAS cannot be found there is no compiled path, and the
trainer runs the reference loop.

The loop is cached on disk like the kernels (about 0.02 s to load against 1.5 s to compile on
the 2-core machine, every run after the first): the BLAS routines are its arguments, so the
cached code calls this process's, and a digest of numba_backend.py is in its cache key
(_loop_over), since it inlines that file's kernels.

What the loop trusts, since nothing inside it checks: CompiledSteps makes every buffer from
the model's own sizes, checks the labels once against the classes, and is handed the
trainer's order, a permutation of the rows.
"""

import ctypes
import hashlib
import importlib
import pathlib

import numpy

from xpnet.backends import numba_backend
from xpnet.backends.numba_backend import (
    _add_bias_relu,
    _mask_and_sum_rows,
    _sgd_update,
    _softmax_cross_entropy,
    _take_rows,
    kernel,
)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
FEATURE_MAJOR_BELOW = 128


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
                return _typed(tuple(getattr(library, name) for name in names))
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


@kernel
def _blas_view(x, transpose):
    """How row-major BLAS sees a 2-D array that is C-ordered or the transpose of a C array (a
    feature-major layer output): its data, its leading dimension, and whether to transpose it."""
    if x.strides[1] != x.itemsize:  # columns are contiguous: x is the transpose of a C array
        return x.ctypes.data, x.strides[1] // x.itemsize, not transpose
    return x.ctypes.data, max(x.strides[0] // x.itemsize, x.shape[1]), transpose


@kernel
def _product(blas, a, transpose_a, b, transpose_b, out, alpha, beta):
    """out = alpha * op(a) @ op(b) + beta * out, op transposing when asked; each array C-ordered
    or the transpose of a C array. One row of output is a gemv, as numpy.matmul does too: 5.9 us
    where sgemm took 30 for the 784 -> 200 layer at batch 1."""
    sgemm, dgemm, sgemv, dgemv = blas
    m, n = out.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    a_data, lda, trans_a = _blas_view(a, transpose_a)
    b_data, ldb, trans_b = _blas_view(b, transpose_b)
    c_data, ldc, trans_c = _blas_view(out, False)
    if trans_c:  # out is the transpose of a C array: compute that one, out.T = op(b).T @ op(a).T
        m, n, a_data, b_data, lda, ldb = n, m, b_data, a_data, ldb, lda
        trans_a, trans_b = not trans_b, not trans_a
    single = out.itemsize == 4  # float32; else float64
    if m == 1 and not trans_a:  # the row = op(b).T @ a's row
        rows, cols = (n, k) if trans_b else (k, n)
        trans = NO_TRANS if trans_b else TRANS
        if single:
            sgemv(ROW_MAJOR, trans, rows, cols, alpha, b_data, ldb, a_data, 1, beta, c_data, 1)
        else:
            dgemv(ROW_MAJOR, trans, rows, cols, alpha, b_data, ldb, a_data, 1, beta, c_data, 1)
        return
    ta, tb = TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS
    if single:
        sgemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a_data, lda, b_data, ldb, beta, c_data, ldc)
    else:
        dgemm(ROW_MAJOR, ta, tb, m, n, k, alpha, a_data, lda, b_data, ldb, beta, c_data, ldc)


def _loop_over(kernels_digest):
    """The compiled loop, as a closure over a digest of numba_backend.py. Numba keys a function's
    disk cache by its own file and the values of its closure, not by the files of what it calls:
    an edit of the kernels the loop inlines changes the digest, so the loop compiles afresh
    rather than loading a copy built from the old kernels."""

    @kernel
    def _train_steps(blas, x_all, y_all, order, first, n, batch_size, weights, biases, relu, grad_weights, grad_biases,
                     velocity_weights, velocity_biases, momentum, nesterov, weight_decay, lrs, inputs, outputs,
                     grads_z, grads_x, grad_logits, labels, losses):  # fmt: skip
        """Steps first .. first + n - 1 of the epoch whose row order is `order`: each gathers its
        batch into `inputs`, runs every layer forward (layer l's output in outputs[l]), the loss
        (stored in losses[k]), and every layer's backward pass and update, last layer first."""
        _ = kernels_digest  # a closure cell, so in Numba's cache key (_loop_over)
        layers = len(weights)
        for s in range(n):
            k = first + s
            start = k * batch_size
            rows = min(batch_size, order.shape[0] - start)
            indices = order[start : start + rows]
            x = inputs[:rows]
            _take_rows(x_all, indices, x)
            y = labels[:rows]
            for i in range(rows):
                y[i] = y_all[indices[i]]
            for layer in range(layers):
                out = outputs[layer][:rows]
                _product(blas, x, False, weights[layer], True, out, 1.0, 0.0)  # out = x @ W.T
                _add_bias_relu(out, biases[layer], relu[layer])
                x = out
            grad = grad_logits[:rows]
            losses[k] = _softmax_cross_entropy(outputs[layers - 1][:rows], y, grad)
            lr = lrs[s]
            for layer in range(layers - 1, -1, -1):
                x = inputs[:rows] if layer == 0 else outputs[layer - 1][:rows]
                grad_z = grads_z[layer][:rows]
                _mask_and_sum_rows(grad, outputs[layer][:rows], relu[layer], grad_z, grad_biases[layer])
                if not relu[layer]:
                    grad_z = grad
                if layer > 0:  # grad_x = g @ W, with the W of this step's forward
                    grad = grads_x[layer][:rows]
                    _product(blas, grad_z, False, weights[layer], False, grad, 1.0, 0.0)
                if momentum == 0:  # W <- (1 - lr * decay) * W - lr * g.T @ x: the update is the product's
                    _product(blas, grad_z, True, x, False, weights[layer], -lr, 1.0 - lr * weight_decay)
                else:
                    _product(blas, grad_z, True, x, False, grad_weights[layer], 1.0, 0.0)  # grad_W = g.T @ x
                    _sgd_update(weights[layer].reshape(-1), grad_weights[layer].reshape(-1), lr,
                                velocity_weights[layer].reshape(-1), momentum, nesterov, weight_decay)  # fmt: skip
                _sgd_update(biases[layer], grad_biases[layer], lr, velocity_biases[layer], momentum, nesterov,
                            weight_decay)  # fmt: skip

    return _train_steps


BLAS = numpy_blas()
_train_steps = _loop_over(hashlib.sha256(pathlib.Path(numba_backend.__file__).read_bytes()).hexdigest())


class CompiledSteps:
    """A trainer's steps as one compiled call: run(order, first, n, lrs, losses) takes steps
    first .. first + n - 1 of the epoch with that row order, updating the model's parameters
    and the optimiser's velocities in place, with lrs[s] the learning rate of step s. It holds
    the model's own arrays: whoever changes a parameter writes into it (value[...] = ...), as
    checkpoints and verify do, and never swaps the array for another. feature_major None keeps
    layer outputs feature-major below FEATURE_MAJOR_BELOW rows; True or False forces a layout."""

    def __init__(self, backend, model, optimizer, train_x, train_y, batch_size, feature_major=None):
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
        feature_major = batch < FEATURE_MAJOR_BELOW if feature_major is None else feature_major
        # The last step's arrays, which verify reads back: the batch and its labels, each layer's
        # output, the loss gradient, each layer's masked output gradient, and grad x of each
        # layer but the first.
        self.inputs = numpy.empty((batch, model.sizes[0]), dtype)
        self.outputs = tuple(
            numpy.empty((size, batch), dtype).T if feature_major else numpy.empty((batch, size), dtype)
            for size in model.sizes[1:]
        )
        self.grads_z = tuple(numpy.empty((batch, size), dtype) for size in model.sizes[1:])
        self.grads_x = tuple(numpy.empty((batch, size), dtype) for size in model.sizes[:-1])
        self.grad_logits = numpy.empty((batch, model.sizes[-1]), dtype)
        self.labels = numpy.empty(batch, train_y.dtype)

    def run(self, order, first, n, lrs, losses):
        x_all, y_all = self.data
        buffers = (self.inputs, self.outputs, self.grads_z, self.grads_x, self.grad_logits, self.labels)
        _train_steps(BLAS, x_all, y_all, order, first, n, self.batch_size, *self.model_arrays, lrs, *buffers, losses)

    def prepare(self, losses):
        """Compile the loop, or load it from the disk cache (a call of no steps), never inside a timed epoch."""
        self.run(numpy.zeros(0, numpy.int64), 0, 0, numpy.zeros(0), losses)
