"""Numba backend: the base class with its hot elementwise and reduction ops fused into
@njit kernels. Matrix products stay with NumPy's BLAS; writing a GEMM would only be slower.

Fused here: bias + ReLU (one pass over the layer output), ReLU mask + bias-gradient column
sum (one pass over the output gradient), softmax + cross-entropy + its gradient (one pass per
row), the SGD update (in place, no temporary), the batch gather and the correct-count.

Threads: kernels are serial. `parallel=True` (prange) versions were measured against these on
the 2-core development machine (`python bench/threads.py`, numbers in bench/README.md): alone,
the parallel gather and SGD update save about 30 us of a ~2,400 us step at batch 512, but in
training they make an epoch 5 to 20 times slower, because Numba's threads and OpenBLAS's
(spinning between products) oversubscribe the two cores. Serial kernels leave both to BLAS.
The compiled loop (numba_steps) uses both cores for them another way: it cuts each step's rows
between two threads of its own, each with one BLAS thread.

Compilation: cache=True stores machine code beside the module, or, when the install is
read-only, in Numba's per-user cache (~/.cache/numba, or $NUMBA_CACHE_DIR); prepare()
compiles (or loads) every kernel for a dtype and reports the time, so it never lands in a
timed epoch.
"""

import math
import time
import warnings

import numpy
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from xpnet.backends.base import Backend

_cache_warned = False


def kernel(function):
    """njit with an on-disk cache, or without one (warning once) where no cache dir is writable."""
    global _cache_warned
    try:
        return njit(cache=True, nogil=True)(function)
    except RuntimeError as exc:  # Numba: "cannot cache function ...: no locator available"
        if not _cache_warned:
            _cache_warned = True
            warnings.warn(
                f"Numba kernels will be compiled on every run: {exc}. "
                "Set NUMBA_CACHE_DIR to a writable directory to cache them.",
                stacklevel=2,
            )
        return njit(nogil=True)(function)


@kernel
def _add_bias_relu(out, b, relu):
    rows, cols = out.shape
    for i in range(rows):
        for j in range(cols):
            value = out[i, j] + b[j]
            if relu and value < 0:  # `value < 0`, not max(): NaN passes through as in NumPy
                value = 0
            out[i, j] = value


@kernel
def _mask_and_sum_rows(grad_y, relu_output, relu, grad_z, grad_b):
    rows, cols = grad_y.shape
    grad_b[:] = 0
    for i in range(rows):
        for j in range(cols):
            g = grad_y[i, j]
            if relu:  # multiply by the mask, as NumPy does, rather than branch: it vectorises (6x)
                g *= relu_output[i, j] > 0
                grad_z[i, j] = g
            grad_b[j] += g


@kernel
def _softmax_cross_entropy(logits, labels, grad, batch_rows):
    """The loss of these rows summed and divided by batch_rows, and its gradient likewise: the
    batch's mean when they are all its rows, their share of it when they are a part of them."""
    rows, cols = logits.shape
    total = 0.0
    for i in range(rows):
        peak = logits[i, 0]
        for j in range(1, cols):
            peak = max(peak, logits[i, j])
        norm = 0.0
        for j in range(cols):
            grad[i, j] = math.exp(logits[i, j] - peak)
            norm += grad[i, j]
        total += math.log(norm) - (logits[i, labels[i]] - peak)
        # The reference's order, (p - onehot) / n: p - 1 cancels when p is near 1, and any
        # other order would round that difference differently.
        for j in range(cols):
            grad[i, j] /= norm
        grad[i, labels[i]] -= 1
        for j in range(cols):
            grad[i, j] /= batch_rows
    return total / batch_rows


@kernel
def _sgd_update(param, grad, lr, velocity, momentum, nesterov, weight_decay):
    # The same operations in the same order as Backend.sgd_update, element by element.
    for i in range(param.size):
        step = grad[i]
        if weight_decay:
            step += weight_decay * param[i]
        if momentum:
            velocity[i] = velocity[i] * momentum + step
            step = step + momentum * velocity[i] if nesterov else velocity[i]
        param[i] -= lr * step


@kernel
def _take_rows(source, indices, out):
    for i in range(indices.size):
        row = indices[i]
        for j in range(source.shape[1]):  # an explicit loop: 2.5x faster than out[i] = source[row]
            out[i, j] = source[row, j]


# How far ahead _take_normalized_rows asks for its rows: a row's memory latency, not its size, is
# most of a gather of random rows, so 8 rows' misses are under way at once (4 to 16 measured alike).
PREFETCH_ROWS_AHEAD = 8


@intrinsic
def _prefetch(typingctx, array, row, column):
    """Ask the CPU to bring array[row, column]'s cache line in (LLVM's prefetch: read, into every
    level): a hint, so it neither waits nor faults."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, args[1:], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        flag = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, flag, flag, flag]), "llvm.prefetch.p0i8"
        )
        builder.call(function, [builder.bitcast(pointer, byte_pointer), flag(0), flag(3), flag(1)])
        return context.get_dummy_value()

    return types.void(array, row, column), codegen


@kernel
def _take_normalized_rows(pixels, indices, mean, std, out):
    """out[i] = (pixels[indices[i]] - mean) / std, in the dtype of mean and std: from uint8 pixels
    with the model's mean and std, MLP.normalize's operations, so its bits. Each row's cache lines
    are asked for PREFETCH_ROWS_AHEAD rows before it is read."""
    n, columns = indices.size, pixels.shape[1]
    line = max(1, 64 // pixels.itemsize)  # elements a cache line holds
    for i in range(n):
        if i + PREFETCH_ROWS_AHEAD < n:
            ahead = indices[i + PREFETCH_ROWS_AHEAD]
            for j in range(0, columns, line):
                _prefetch(pixels, ahead, j)
        row = indices[i]
        for j in range(columns):
            out[i, j] = (pixels[row, j] - mean) / std


@kernel
def _count_correct(logits, labels):
    correct = 0
    for i in range(logits.shape[0]):
        best, has_nan = 0, False
        for j in range(logits.shape[1]):
            has_nan |= logits[i, j] != logits[i, j]
            if logits[i, j] > logits[i, best]:
                best = j
        correct += best == labels[i] and not has_nan
    return correct


@kernel
def _outside(values, stop):
    for value in values:
        if value < 0 or value >= stop:
            return True
    return False


def _c_contiguous(*arrays):
    return all(a.flags.c_contiguous for a in arrays)


class NumbaBackend(Backend):
    name = "numba"

    def prepare(self, dtype):
        """Compile (or load from cache) every kernel for dtype; returns the seconds taken."""
        start = time.perf_counter()
        x = numpy.ones((2, 3), dtype)
        W = numpy.ones((4, 3), dtype)
        b = numpy.zeros(4, dtype)
        labels = numpy.zeros(2, numpy.int64)
        y = self.linear_forward(x, W, b, relu=True)
        self.linear_backward(x, W, y, relu_output=y)
        self.linear_backward(x, W, y, grad_x=numpy.empty_like(x))
        self.softmax_cross_entropy(y, labels)
        self.count_correct(y, labels)
        self.sgd_update(W, numpy.zeros_like(W), 0.1)
        self.sgd_update(W, numpy.zeros_like(W), 0.1, numpy.zeros_like(W), 0.9, True, 1e-4)
        self.take_rows(x, labels)
        self.take_rows(labels, labels)
        return time.perf_counter() - start

    def compile_steps(self, model, optimizer, train_x, train_y, batch_size, train_images=None):
        from xpnet.backends import numba_steps

        if numba_steps.BLAS is None:  # NumPy's BLAS not found: the reference loop it is
            return None
        return numba_steps.CompiledSteps(
            self, model, optimizer, train_x, train_y, batch_size, train_images=train_images
        )

    def _outside(self, values, stop):
        return _outside(values, stop)  # one pass, no temporaries: 0.2 us for a batch's labels, against 1.7

    def _take_rows(self, source, indices, out):
        if not _c_contiguous(source, out):  # the kernel sees rows as flat runs of memory
            return super()._take_rows(source, indices, out)
        # One 2-D kernel serves images and labels alike (labels as one-column rows).
        _take_rows(source.reshape(len(source), -1), indices, out.reshape(len(out), -1))
        return out

    def _linear_forward(self, x, W, b, relu, out):
        numpy.matmul(x, W.T, out=out)
        _add_bias_relu(out, b, relu)
        return out

    def _linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x, relu_output, grad_z):
        relu = relu_output is not None
        _mask_and_sum_rows(grad_y, relu_output if relu else grad_y, relu, grad_z, grad_b)
        numpy.matmul(grad_z.T, x, out=grad_W)
        if grad_x is not None:
            numpy.matmul(grad_z, W, out=grad_x)

    def _softmax_cross_entropy(self, logits, labels, grad):
        return logits.dtype.type(_softmax_cross_entropy(logits, labels, grad, logits.shape[0]))

    def _count_correct(self, logits, labels):
        return numpy.asarray(_count_correct(logits, labels))

    def _sgd_update(self, param, grad, lr, velocity, momentum, nesterov, weight_decay):
        if velocity is None:  # the kernel reads velocity only when momentum is set
            velocity, momentum = param, 0.0
        if not _c_contiguous(param, grad, velocity):  # the kernel walks them as one flat run each
            return super()._sgd_update(
                param, grad, lr, velocity if momentum else None, momentum, nesterov, weight_decay
            )
        _sgd_update(param.reshape(-1), grad.reshape(-1), lr, velocity.reshape(-1), momentum, nesterov, weight_decay)
