"""The Numba backend's kernels: the hot elementwise and reduction ops fused, each one pass.

Fused: bias + activation (one pass over a layer's output), the activation's derivative + the
bias gradient's column sums (one pass over the output gradient), softmax + cross-entropy + its
gradient (one pass per row), the SGD update (in place, no temporary), the batch gather and the
count of correct rows. NumbaBackend (numba_backend.py) calls them op by op; the compiled loop
(numba_steps.py) inlines them. They are serial: `parallel=True` versions made an epoch 5 to 20
times slower beside OpenBLAS's threads on two cores (bench/history.md, "Threads").

cache=True stores machine code beside the module, or, in a read-only install, in Numba's
per-user cache (~/.cache/numba, or $NUMBA_CACHE_DIR).
"""

import math
import warnings

import numpy
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

import xpnet.backends.philox as reference
from xpnet.backends.base import INV_SQRT_2PI, SQRT_HALF, activation_code

IDENTITY, RELU, TANH, SIGMOID = (activation_code(name) for name in ("identity", "relu", "tanh", "sigmoid"))
_cache_warned = False


def kernel(function=None, parallel=False):
    """njit with an on-disk cache, or without one (warning once) where no cache dir is writable;
    parallel=True (as @kernel(parallel=True)) runs prange loops on Numba's threads."""
    global _cache_warned
    if function is None:
        return lambda function: kernel(function, parallel)
    try:
        return njit(cache=True, nogil=True, parallel=parallel)(function)
    except RuntimeError as exc:  # Numba: "cannot cache function ...: no locator available"
        if not _cache_warned:
            _cache_warned = True
            warnings.warn(
                f"Numba kernels will be compiled on every run: {exc}. "
                "Set NUMBA_CACHE_DIR to a writable directory to cache them.",
                stacklevel=2,
            )
        return njit(nogil=True, parallel=parallel)(function)


@kernel
def add_bias_activate(out, b, activation):
    """out = f(out + b), f the activation of that code."""
    rows, cols = out.shape
    for i in range(rows):
        for j in range(cols):
            value = out[i, j] + b[j]
            if activation == RELU and value < 0:  # `value < 0`, not max(): NaN passes through as in NumPy
                value = 0
            elif activation == TANH:
                value = math.tanh(value)
            elif activation == SIGMOID:  # as Backend._linear_forward computes it, operation by operation
                value = math.tanh(value * 0.5) * 0.5 + 0.5
            out[i, j] = value


@kernel
def activation_grad_and_sum_rows(grad_y, output, activation, grad_z, grad_b):
    """grad_z = grad_y * f'(z) from the layer's output y = f(z) (identity: grad_z is not written,
    grad_y is g), and grad_b = the column sums of g."""
    rows, cols = grad_y.shape
    grad_b[:] = 0
    for i in range(rows):
        for j in range(cols):
            g = grad_y[i, j]
            if activation == RELU:  # multiply by the mask, as NumPy does, rather than branch: it vectorises (6x)
                g *= output[i, j] > 0
                grad_z[i, j] = g
            elif activation == TANH:
                g = (1 - output[i, j] * output[i, j]) * g
                grad_z[i, j] = g
            elif activation == SIGMOID:
                g = (1 - output[i, j]) * output[i, j] * g
                grad_z[i, j] = g
            grad_b[j] += g


@kernel
def add_bias_gelu(z, b, out):
    """z += b and out = GELU(z) = 0.5 * z * (1 + erf(z / sqrt(2))), as Backend._gelu computes
    it; out may be z."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            value = z[i, j] + b[j]
            z[i, j] = value
            out[i, j] = value * 0.5 * (1 + math.erf(value * SQRT_HALF))


@kernel
def gelu_grad_and_sum_rows(grad_y, z, grad_z, grad_b):
    """grad_z = grad_y * (Phi(z) + z * phi(z)), GELU's derivative from the pre-activation z, and
    grad_b = the column sums of grad_z."""
    rows, cols = grad_y.shape
    grad_b[:] = 0
    for i in range(rows):
        for j in range(cols):
            value = z[i, j]
            cdf = (1 + math.erf(value * SQRT_HALF)) * 0.5
            pdf = math.exp(value * value * -0.5) * INV_SQRT_2PI
            g = grad_y[i, j] * (cdf + pdf * value)
            grad_z[i, j] = g
            grad_b[j] += g


# Philox's constants as uint64 (backends/philox.py): Numba takes uint64 mixed with int64 to float64.
M0, M1, W0, W1, MASK32, HALF = map(
    numpy.uint64, (reference.M0, reference.M1, reference.W0, reference.W1, 2**32 - 1, 32)
)


@kernel
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of one counter, word for word philox.philox4x32 (uint64 words below 2**32)."""
    for round_number in range(reference.ROUNDS):
        if round_number:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = c0 * M0, c2 * M1
        c0, c1, c2, c3 = (p1 >> HALF) ^ c1 ^ k0, p1 & MASK32, (p0 >> HALF) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


@kernel
def dropout(x, threshold, scale, step, layer, epoch, k0, k1, out, mask):
    """mask = scale where the element's Philox word (philox.words) is >= threshold, else 0, and
    out = x * mask, over flat arrays; the integers are uint64."""
    for block in range((x.size + 3) // 4):
        words = philox(numpy.uint64(block), step, layer, epoch, k0, k1)
        for lane in range(min(4, x.size - 4 * block)):
            e = 4 * block + lane
            mask[e] = scale if words[lane] >= threshold else 0
            out[e] = x[e] * mask[e]


@kernel
def softmax_cross_entropy(logits, labels, grad, batch_rows):
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
def sgd_update(param, grad, lr, velocity, momentum, nesterov, weight_decay):
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
def take_rows(source, indices, out):
    for i in range(indices.size):
        row = indices[i]
        for j in range(source.shape[1]):  # an explicit loop: 2.5x faster than out[i] = source[row]
            out[i, j] = source[row, j]


# How far ahead _take_normalized_rows asks for its rows: a row's memory latency, not its size, is
# most of a gather of random rows, so 8 rows' misses are under way at once (4 to 16 measured alike).
PREFETCH_ROWS_AHEAD = 8


@intrinsic
def prefetch(typingctx, array, row, column):
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
def take_normalized_rows(pixels, indices, mean, std, out):
    """out[i] = (pixels[indices[i]] - mean) / std, in the dtype of mean and std: from uint8 pixels
    with the model's mean and std, MLP.normalize's operations, so its bits. Each row's cache lines
    are asked for PREFETCH_ROWS_AHEAD rows before it is read."""
    n, columns = indices.size, pixels.shape[1]
    line = max(1, 64 // pixels.itemsize)  # elements a cache line holds
    for i in range(n):
        if i + PREFETCH_ROWS_AHEAD < n:
            ahead = indices[i + PREFETCH_ROWS_AHEAD]
            for j in range(0, columns, line):
                prefetch(pixels, ahead, j)
        row = indices[i]
        for j in range(columns):
            out[i, j] = (pixels[row, j] - mean) / std


@kernel
def count_correct(logits, labels):
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
def outside(values, stop):
    for value in values:
        if value < 0 or value >= stop:
            return True
    return False


# CBLAS's codes for the layout and whether to transpose.
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@kernel
def blas_view(x, transpose):
    """How row-major BLAS sees a 2-D array that is C-ordered or the transpose of a C array (a
    feature-major layer output): its data, its leading dimension, and whether to transpose it."""
    if x.strides[1] != x.itemsize:  # columns are contiguous: x is the transpose of a C array
        return x.ctypes.data, x.strides[1] // x.itemsize, not transpose
    return x.ctypes.data, max(x.strides[0] // x.itemsize, x.shape[1]), transpose


@kernel
def product(blas, a, transpose_a, b, transpose_b, out, alpha, beta):
    """out = alpha * op(a) @ op(b) + beta * out, op transposing when asked; each array C-ordered
    or the transpose of a C array. One row of output is a gemv, as numpy.matmul does too: 5.9 us
    where sgemm took 30 for the 784 -> 200 layer at batch 1."""
    sgemm, dgemm, sgemv, dgemv = blas
    m, n = out.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    a_data, lda, trans_a = blas_view(a, transpose_a)
    b_data, ldb, trans_b = blas_view(b, transpose_b)
    c_data, ldc, trans_c = blas_view(out, False)
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
