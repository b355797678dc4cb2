"""The output layer, its loss and their gradients in three CUDA kernels (CupyBackend._fused_head).

With cuBLAS, a captured step spends six kernels on the output layer of a 10-class MLP: its
product and its bias, the loss, the bias gradient, and two products for the gradients of the
weights and of the layer's input. These are products of ten columns, where cuBLAS picks its
slowest kernels (bench/results-gpu-h200.md, call 9: three SIMT kernels of 4.0-4.4 us a step).
Here the output layer is narrow enough that a thread keeps a sum for every class in registers:

- head_rows, one block a row: the logits (each thread sums its share of the row's inputs for
  every class, a tree over the block adds the shares), the loss and the logits' gradient as the
  loss kernel computes them, and the input's gradient grad_logits @ W, while the row is at hand.
- head_slice_sums, one block for 32 columns of W (and the bias, a column of ones) and 64 rows:
  each of its 8 lanes sums 8 rows for every class, the block adds its lanes, and the tile-0
  blocks add their rows' losses. A slice of rows a block keeps every multiprocessor busy.
- head_finish, one thread an output: the slices' sums in slice order, and the mean loss.

Every sum runs in a fixed order, so a step is deterministic. The result is the reference's
within the float bounds of its sums (the order differs from cuBLAS's and NumPy's).
"""

from typing import NamedTuple

import numpy

from xpnet.backends.base import FLOAT_DTYPES
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
__global__ void head_rows(const T* inputs, const T* W, const T* b, const long long* labels, T* logits,
                          T* grad_logits, T* grad_inputs, double* row_losses, int rows, int width, int classes) {
    __shared__ T partial[HEAD_MAX_CLASSES][HEAD_ROW_THREADS];
    __shared__ T grad[HEAD_MAX_CLASSES];
    int t = threadIdx.x;
    long long i = blockIdx.x;  // the grid is one block a row
    const T* x = inputs + i * width;
    T sums[HEAD_MAX_CLASSES];
#pragma unroll
    for (int c = 0; c < HEAD_MAX_CLASSES; ++c) sums[c] = 0;
    for (int j = t; j < width; j += HEAD_ROW_THREADS) {
        T xj = x[j];
#pragma unroll
        for (int c = 0; c < HEAD_MAX_CLASSES; ++c)
            if (c < classes) sums[c] += xj * W[(long long)c * width + j];
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
    T* grad_x = grad_inputs + i * width;
    for (int j = t; j < width; j += HEAD_ROW_THREADS) {
        T sum = 0;
        for (int c = 0; c < classes; ++c) sum += grad[c] * W[(long long)c * width + j];
        grad_x[j] = sum;
    }
}

// Column j of a tile, j == width the bias's column of ones; sums[slice][c][j] over the slice's rows.
template <typename T>
__global__ void head_slice_sums(const T* inputs, const T* grad_logits, const double* row_losses, T* sums,
                                double* slice_losses, int rows, int width, int classes) {
    __shared__ T partial[HEAD_MAX_CLASSES][HEAD_LANES][HEAD_COLUMNS];
    __shared__ double lane_losses[HEAD_LANES];
    int tiles = (width + HEAD_COLUMNS) / HEAD_COLUMNS;  // ceil((width + 1) / HEAD_COLUMNS)
    int tile = blockIdx.x % tiles, slice = blockIdx.x / tiles;
    int column = threadIdx.x % HEAD_COLUMNS, lane = threadIdx.x / HEAD_COLUMNS;
    int j = tile * HEAD_COLUMNS + column;
    int first = slice * HEAD_SLICE_ROWS, end = rows - first < HEAD_SLICE_ROWS ? rows : first + HEAD_SLICE_ROWS;
    T own[HEAD_MAX_CLASSES];
#pragma unroll
    for (int c = 0; c < HEAD_MAX_CLASSES; ++c) own[c] = 0;
    double loss = 0;
    if (j <= width) {  // no return: every thread of the block must reach the barrier
        for (int i = first + lane; i < end; i += HEAD_LANES) {
            T x = j < width ? inputs[(long long)i * width + j] : (T)1;
            const T* g = grad_logits + (long long)i * classes;
#pragma unroll
            for (int c = 0; c < HEAD_MAX_CLASSES; ++c)
                if (c < classes) own[c] += g[c] * x;
            if (j == 0) loss += row_losses[i];
        }
    }
#pragma unroll
    for (int c = 0; c < HEAD_MAX_CLASSES; ++c) partial[c][lane][column] = own[c];
    if (column == 0) lane_losses[lane] = loss;
    __syncthreads();
    if (j <= width) {
        for (int c = lane; c < classes; c += HEAD_LANES) {
            T total = 0;
            for (int l = 0; l < HEAD_LANES; ++l) total += partial[c][l][column];
            sums[((long long)slice * classes + c) * (width + 1) + j] = total;
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
__global__ void head_finish(const T* sums, const double* slice_losses, T* grad_W, T* grad_b, T* loss, int slices,
                            int rows, int width, int classes) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long outputs = (long long)classes * (width + 1);
    if (k < outputs) {
        T total = 0;
        for (int s = 0; s < slices; ++s) total += sums[s * outputs + k];
        long long c = k / (width + 1), j = k % (width + 1);
        if (j < width) grad_W[c * width + j] = total;
        else grad_b[c] = total;
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
    """What the fused head reads (inputs: the last hidden layer's output; W, b: the output layer's
    parameters; labels) and writes (the layer's logits, their gradient, the gradient with respect
    to its inputs, W's and b's gradients, and the batch's mean loss in a 1-element array)."""

    inputs: object
    W: object
    b: object
    labels: object
    logits: object
    grad_logits: object
    grad_inputs: object
    grad_W: object
    grad_b: object
    loss: object


class HeadWorkspace(NamedTuple):
    """The fused head's scratch arrays for a batch of `rows` rows (workspace() makes them)."""

    row_losses: object  # (rows,) float64
    sums: object  # (slices, classes, width + 1), the arrays' dtype
    slice_losses: object  # (slices,) float64


def slices(rows):
    return -(-rows // HEAD_SLICE_ROWS)


def workspace(xp, rows, width, classes, dtype):
    n = slices(rows)
    return HeadWorkspace(
        xp.empty(rows, numpy.float64), xp.empty((n, classes, width + 1), dtype), xp.empty(n, numpy.float64)
    )


def head_problem(sizes):
    """None where the fused head runs a model of these layer sizes; else why not."""
    if len(sizes) < 3:
        return "it fuses an output layer after a hidden layer"
    if sizes[-1] > HEAD_MAX_CLASSES:
        return f"it fuses output layers of at most {HEAD_MAX_CLASSES} classes, not {sizes[-1]}"
    return None


def check_head(head, scratch):
    """Raise ArgumentError unless the arrays are what the kernels index by the inputs' and W's
    shapes: every array contiguous, of one float dtype (labels int64), of its shape."""
    rows, width = head.inputs.shape
    classes = head.W.shape[0]
    dtype = head.inputs.dtype
    expected = {
        "W": ((classes, width), dtype),
        "b": ((classes,), dtype),
        "labels": ((rows,), numpy.dtype(numpy.int64)),
        "logits": ((rows, classes), dtype),
        "grad_logits": ((rows, classes), dtype),
        "grad_inputs": ((rows, width), dtype),
        "grad_W": ((classes, width), dtype),
        "grad_b": ((classes,), dtype),
        "loss": ((1,), dtype),
        "row_losses": ((rows,), numpy.dtype(numpy.float64)),
        "sums": ((slices(rows), classes, width + 1), dtype),
        "slice_losses": ((slices(rows),), numpy.dtype(numpy.float64)),
    }
    arrays = {**head._asdict(), **scratch._asdict()}
    if dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"the fused head takes float32 or float64 arrays, got {dtype}")
    if not 0 < classes <= HEAD_MAX_CLASSES:
        raise ArgumentError(f"the fused head takes 1 to {HEAD_MAX_CLASSES} classes, got W of shape {head.W.shape}")
    for name, array in arrays.items():
        shape, kind = expected.get(name, (head.inputs.shape, dtype))
        if array.shape != shape or array.dtype != kind or not array.flags.c_contiguous:
            layout = "" if array.flags.c_contiguous else "non-contiguous "
            raise ArgumentError(
                f"fused head: {name} must be a contiguous {kind} array of shape {shape}, "
                f"got a {layout}{array.dtype} array of shape {array.shape}"
            )
