"""The last hidden layer's bias and activation, the output layer, the loss and their gradients
in three CUDA kernels, for the captured step (CupyBackend._fused_head).

With cuBLAS, a captured step spends eight kernels here on a 10-class MLP: the hidden layer's
bias and activation, the output layer's product and bias, the loss, the output bias's gradient,
two products for the gradients of W and of the hidden output, and the hidden layer's activation
derivative and bias gradient. The products have ten columns, where cuBLAS picks its slowest
kernels (bench/results-gpu-h200.md, call 9: three SIMT kernels of 4.0-4.4 us a step). A
thread can keep a sum for every class in registers instead:

- head_rows, one block a row: the hidden layer's output y = f(z + b) in place of the product z
  that cuBLAS wrote, the logits (each thread sums its share of the row for every class, a tree
  over the block adds the shares), the loss and the logits' gradient as the loss kernel computes
  them, then the hidden output's gradient grad_logits @ W and its product with f'.
- head_slice_sums, one block for 32 columns of the hidden layer (the output bias is one more
  column, of ones) and 64 rows: each of its 8 lanes sums 8 rows, for every class (W's gradient)
  and for the hidden bias's gradient; the block adds its lanes, and its first tile the losses.
  A slice of rows a block keeps every multiprocessor busy.
- head_finish, one thread an output: the slices' sums in slice order, and the mean loss.

Every sum runs in a fixed order, so a step is deterministic. The results are the reference's
within the float bounds of their sums (the order differs from cuBLAS's and NumPy's). The
kernels use the block module's activate and activation_grad, defined before them.
"""

from typing import NamedTuple

import numpy

from xpnet.backends.base import FLOAT_DTYPES
from xpnet.backends.steps import OUTPUT_ACTIVATIONS
from xpnet.errors import ArgumentError

HEAD_MAX_CLASSES = 16  # a sum per class in each thread's registers
HEAD_ROW_THREADS = 128
HEAD_COLUMNS, HEAD_LANES, HEAD_SLICE_ROWS = 32, 8, 64

_DEFINES = f"""
#define HEAD_MAX_CLASSES {HEAD_MAX_CLASSES}
#define HEAD_ROW_THREADS {HEAD_ROW_THREADS}
#define HEAD_COLUMNS {HEAD_COLUMNS}
#define HEAD_LANES {HEAD_LANES}
#define HEAD_SLICE_ROWS {HEAD_SLICE_ROWS}
"""

# Kernels whose threads meet at barriers (the backend's block module).
HEAD_BLOCK_SOURCE = (
    _DEFINES
    + r"""
template <typename T>
__global__ void head_rows(T* hidden, const T* hidden_b, int activation, const T* W, const T* b,
                          const long long* labels, T* logits, T* grad_logits, T* grad_hidden, T* grad_hidden_z,
                          double* row_losses, int rows, int width, int classes) {
    __shared__ T partial[HEAD_MAX_CLASSES][HEAD_ROW_THREADS];
    __shared__ T grad[HEAD_MAX_CLASSES];
    int t = threadIdx.x;
    long long i = blockIdx.x;  // the grid is one block a row
    T* y = hidden + i * width;
    T sums[HEAD_MAX_CLASSES];
#pragma unroll
    for (int c = 0; c < HEAD_MAX_CLASSES; ++c) sums[c] = 0;
    for (int j = t; j < width; j += HEAD_ROW_THREADS) {
        T yj = activate(y[j] + hidden_b[j], activation);
        y[j] = yj;
#pragma unroll
        for (int c = 0; c < HEAD_MAX_CLASSES; ++c)
            if (c < classes) sums[c] += yj * W[(long long)c * width + j];
    }
#pragma unroll
    for (int c = 0; c < HEAD_MAX_CLASSES; ++c) partial[c][t] = sums[c];
    __syncthreads();
    for (int half = HEAD_ROW_THREADS / 2; half > 0; half /= 2) {
        if (t < half)
            for (int c = 0; c < classes; ++c) partial[c][t] += partial[c][t + half];
        __syncthreads();
    }
    if (t == 0) {  // the loss kernel's arithmetic, in its order
        T* z = logits + i * classes;
        T* g = grad_logits + i * classes;
        for (int c = 0; c < classes; ++c) z[c] = partial[c][0] + b[c];
        long long label = labels[i];
        if (label < 0 || label >= classes) {  // never index outside the row: check_range reports the fault
            row_losses[i] = nan("");
            for (int c = 0; c < classes; ++c) g[c] = grad[c] = nan("");
        } else {
            T peak = z[0];
            for (int c = 1; c < classes; ++c) peak = z[c] > peak ? z[c] : peak;
            double norm = 0;
            for (int c = 0; c < classes; ++c) { g[c] = exp(z[c] - peak); norm += g[c]; }
            row_losses[i] = log(norm) - (double)(z[label] - peak);
            for (int c = 0; c < classes; ++c) g[c] /= (T)norm;
            g[label] -= 1;
            for (int c = 0; c < classes; ++c) grad[c] = g[c] /= (T)rows;
        }
    }
    __syncthreads();
    T* grad_y = grad_hidden + i * width;
    T* grad_z = grad_hidden_z + i * width;
    for (int j = t; j < width; j += HEAD_ROW_THREADS) {  // each thread reads back only its own y[j]
        T sum = 0;
        for (int c = 0; c < classes; ++c) sum += grad[c] * W[(long long)c * width + j];
        grad_y[j] = sum;
        grad_z[j] = activation_grad(sum, y[j], activation);  // for identity, sum again: grad_z may be grad_y
    }
}

// Column j of a tile (j == width: the output bias's column of ones); over the slice's rows,
// sums[slice][c][j] = sum of grad_logits[., c] * hidden[., j], and sums[slice][classes][j] the
// hidden bias's gradient, the sum of grad_hidden_z[., j].
template <typename T>
__global__ void head_slice_sums(const T* hidden, const T* grad_logits, const T* grad_hidden_z,
                                const double* row_losses, T* sums, double* slice_losses, int rows, int width,
                                int classes) {
    __shared__ T partial[HEAD_MAX_CLASSES + 1][HEAD_LANES][HEAD_COLUMNS];  // the last: the hidden bias's
    __shared__ double lane_losses[HEAD_LANES];
    int tiles = (width + HEAD_COLUMNS) / HEAD_COLUMNS;  // ceil((width + 1) / HEAD_COLUMNS)
    int tile = blockIdx.x % tiles, slice = blockIdx.x / tiles;
    int column = threadIdx.x % HEAD_COLUMNS, lane = threadIdx.x / HEAD_COLUMNS;
    int j = tile * HEAD_COLUMNS + column;
    int first = slice * HEAD_SLICE_ROWS, end = rows - first < HEAD_SLICE_ROWS ? rows : first + HEAD_SLICE_ROWS;
    T own[HEAD_MAX_CLASSES + 1];
#pragma unroll
    for (int c = 0; c <= HEAD_MAX_CLASSES; ++c) own[c] = 0;
    double loss = 0;
    if (j <= width) {  // no return: every thread of the block must reach the barrier
        for (int i = first + lane; i < end; i += HEAD_LANES) {
            long long k = (long long)i * width + j;
            T x = j < width ? hidden[k] : (T)1;
            const T* g = grad_logits + (long long)i * classes;
#pragma unroll
            for (int c = 0; c < HEAD_MAX_CLASSES; ++c)
                if (c < classes) own[c] += g[c] * x;
            if (j < width) own[HEAD_MAX_CLASSES] += grad_hidden_z[k];
            if (j == 0) loss += row_losses[i];
        }
    }
#pragma unroll
    for (int c = 0; c <= HEAD_MAX_CLASSES; ++c) partial[c][lane][column] = own[c];
    if (column == 0) lane_losses[lane] = loss;
    __syncthreads();
    if (j <= width) {
        for (int c = lane; c <= classes; c += HEAD_LANES) {
            int slot = c < classes ? c : HEAD_MAX_CLASSES;
            T total = 0;
            for (int l = 0; l < HEAD_LANES; ++l) total += partial[slot][l][column];
            sums[((long long)slice * (classes + 1) + c) * (width + 1) + j] = total;
        }
    }
    if (tile == 0 && threadIdx.x == 0) {
        double total = 0;
        for (int l = 0; l < HEAD_LANES; ++l) total += lane_losses[l];
        slice_losses[slice] = total;
    }
}
"""
)

# One thread an output, none waiting for another (the backend's raw module).
HEAD_RAW_SOURCE = r"""
template <typename T>
__global__ void head_finish(const T* sums, const double* slice_losses, T* grad_W, T* grad_b, T* grad_hidden_b,
                            T* loss, int slices, int rows, int width, int classes) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long outputs = (long long)(classes + 1) * (width + 1);
    if (k < outputs) {
        T total = 0;
        for (int s = 0; s < slices; ++s) total += sums[s * outputs + k];
        long long c = k / (width + 1), j = k % (width + 1);
        if (c < classes && j < width) grad_W[c * width + j] = total;
        else if (c < classes) grad_b[c] = total;
        else if (j < width) grad_hidden_b[j] = total;  // c == classes: the hidden bias's row
    } else if (k == outputs) {
        double total = 0;
        for (int s = 0; s < slices; ++s) total += slice_losses[s];
        *loss = (T)(total / rows);
    }
}
"""

BLOCK_TEMPLATES = ("head_rows", "head_slice_sums")
RAW_TEMPLATES = ("head_finish",)


class HeadArrays(NamedTuple):
    """What the fused head reads and writes. hidden: the last hidden layer's product x @ W.T on
    entry, its output y = f(hidden + hidden_b) on return; W, b: the output layer's parameters;
    logits and their gradient; grad_hidden: the loss's gradient with respect to y, grad_hidden_z
    that through f' (for identity the same values, so it may be grad_hidden itself); the
    parameters' gradients; loss: the batch's mean, a 1-element array."""

    hidden: object
    hidden_b: object
    activation: str
    W: object
    b: object
    labels: object
    logits: object
    grad_logits: object
    grad_hidden: object
    grad_hidden_z: object
    grad_hidden_b: object
    grad_W: object
    grad_b: object
    loss: object


class HeadWorkspace(NamedTuple):
    """The fused head's scratch arrays for a batch of `rows` rows (workspace() makes them)."""

    row_losses: object  # (rows,) float64
    sums: object  # (slices, classes + 1, width + 1), the arrays' dtype
    slice_losses: object  # (slices,) float64


def slices(rows):
    """How many slices of HEAD_SLICE_ROWS rows (the last may be short) cover `rows`."""
    return -(-rows // HEAD_SLICE_ROWS)


def workspace(xp, rows, width, classes, dtype):
    """The HeadWorkspace of a batch of `rows` rows, `width` hidden units and `classes` classes."""
    n = slices(rows)
    return HeadWorkspace(
        xp.empty(rows, numpy.float64), xp.empty((n, classes + 1, width + 1), dtype), xp.empty(n, numpy.float64)
    )


def head_problem(sizes, activation):
    """None where the fused head runs a model of these layer sizes and hidden activation; else why not."""
    if len(sizes) < 3:
        return "it fuses an output layer after a hidden layer"
    if sizes[-1] > HEAD_MAX_CLASSES:
        return f"it fuses output layers of at most {HEAD_MAX_CLASSES} classes, not {sizes[-1]}"
    if activation not in OUTPUT_ACTIVATIONS:
        return f"it fuses hidden activations whose output gives their derivative, not {activation}"
    return None


def check_head(head, scratch):
    """Raise ArgumentError unless the arrays are what the kernels index by hidden's and W's shapes:
    every array contiguous, of one float dtype (labels int64), of its shape; and the activation
    one that its output alone differentiates."""
    if head.hidden.ndim != 2 or head.W.ndim != 2 or not len(head.hidden):
        raise ArgumentError(
            f"the fused head takes 2-D hidden and W, hidden of one row or more, got shapes {head.hidden.shape} "
            f"and {head.W.shape}"
        )
    rows, width = head.hidden.shape
    classes = head.W.shape[0]
    dtype = head.hidden.dtype
    if dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"the fused head takes float32 or float64 arrays, got {dtype}")
    if not 0 < classes <= HEAD_MAX_CLASSES:
        raise ArgumentError(f"the fused head takes 1 to {HEAD_MAX_CLASSES} classes, got W of shape {head.W.shape}")
    if head.activation not in OUTPUT_ACTIVATIONS:
        lowered = ", ".join(OUTPUT_ACTIVATIONS)
        raise ArgumentError(f"the fused head takes the activations {lowered}, not {head.activation!r}")
    rows_by_width, by_classes = ((rows, width), dtype), ((rows, classes), dtype)
    expected = {
        "hidden": rows_by_width,
        "hidden_b": ((width,), dtype),
        "W": ((classes, width), dtype),
        "b": ((classes,), dtype),
        "labels": ((rows,), numpy.dtype(numpy.int64)),
        "logits": by_classes,
        "grad_logits": by_classes,
        "grad_hidden": rows_by_width,
        "grad_hidden_z": rows_by_width,
        "grad_hidden_b": ((width,), dtype),
        "grad_W": ((classes, width), dtype),
        "grad_b": ((classes,), dtype),
        "loss": ((1,), dtype),
        "row_losses": ((rows,), numpy.dtype(numpy.float64)),
        "sums": ((slices(rows), classes + 1, width + 1), dtype),
        "slice_losses": ((slices(rows),), numpy.dtype(numpy.float64)),
    }
    arrays = {**head._asdict(), **scratch._asdict()}
    for name, (shape, kind) in expected.items():
        array = arrays[name]
        if array.shape != shape or array.dtype != kind or not array.flags.c_contiguous:
            layout = "" if array.flags.c_contiguous else "non-contiguous "
            raise ArgumentError(
                f"fused head: {name} must be a contiguous {kind} array of shape {shape}, "
                f"got a {layout}{array.dtype} array of shape {array.shape}"
            )
