"""CuPy backend: xp = cupy, matrix products through cuBLAS, the hot ops as fused CUDA kernels.

The data lives on the GPU: the trainer moves the training set once and gathers batches there,
and the loss and accuracy are summed on the device and read back once per epoch. CuPy
refuses implicit conversion to NumPy, so a stray host copy inside a step is an error, not a
slowdown. Kernels are built lazily (CuPy compiles at first launch and caches on disk), never
at import. TF32 is left off (CUPY_TF32 unset), so float32 products keep full precision and
the parity tests' float32 bounds hold.

Argument checks: shapes and dtypes are checked on the host by the base class, as on every
backend. Label and index ranges are checked on the GPU (check_range) and the result is read
with the next read from the device, so a step never waits for them; the kernels themselves
never index outside their arrays whatever the labels hold. The raw kernels index linearly, so
non-contiguous arguments go through contiguous copies.

This module imports without CuPy: CuPy is an optional extra and is imported when a
CupyBackend is made.
"""

import functools
import math
import time

import numpy

from xpnet.backends import cupy_graphs
from xpnet.backends.base import ACTIVATIONS, Backend, Declined, activation_code
from xpnet.errors import ArgumentError, BackendUnavailable

INSTALL_HINT = (
    "pip install 'xpnet[cuda12]' for a CUDA 12 driver or 'xpnet[cuda13]' for CUDA 13 "
    "(nvidia-smi shows the driver's CUDA version)"
)

# Each activation's code, as the kernels compare them (base.activation_code).
ACTIVATION_CODES = "".join(f"#define ACTIVATION_{name.upper()} {activation_code(name)}\n" for name in ACTIVATIONS)

# The bias gradient sums a column over every row. One thread per column walking all rows left
# a 784-200 layer's backward pass at 98 us of GPU time at batch 512 and 374 us at 2048 on an
# H200 (bench/gpu_ops.py): 200 threads, each a long serial loop. Two passes instead, each a loop
# of about sqrt(rows): one thread per (block of rows, column) masks its rows and sums them, then
# one thread per column sums the blocks' sums, in block order (deterministic, and no thread
# shares anything with another, so the CPU emulation runs them as they are).
_ACTIVATION_GRAD_AND_SUM_ROWS = r"""
template <typename T>
__global__ void activation_grad_and_sum_row_blocks(const T* grad_y, const T* output, int activation, T* grad_z,
                                                   T* block_sums, int rows, int cols, int block_rows) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;  // consecutive threads, consecutive columns: coalesced
    int j = t % cols, first = (t / cols) * block_rows;
    if (first >= rows) return;
    int last = first + block_rows < rows ? first + block_rows : rows;
    T sum = 0;
    for (int i = first; i < last; ++i) {
        int k = i * cols + j;
        T g = grad_y[k];
        if (activation == ACTIVATION_RELU) {
            if (!(output[k] > 0)) g = 0;
            grad_z[k] = g;
        }
        sum += g;
    }
    block_sums[(t / cols) * cols + j] = sum;
}

template <typename T>
__global__ void sum_rows(const T* values, T* sums, int rows, int cols) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    T sum = 0;
    for (int i = 0; i < rows; ++i) sum += values[i * cols + j];
    sums[j] = sum;
}
"""

_SOFTMAX_CROSS_ENTROPY = r"""
template <typename T>
__global__ void softmax_cross_entropy(const T* logits, const long long* labels, T* grad, double* row_loss,
                                      int rows, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per row: rows are short (10 classes)
    if (i >= rows) return;
    const T* z = logits + (long long)i * cols;
    T* g = grad + (long long)i * cols;
    long long label = labels[i];
    if (label < 0 || label >= cols) {  // never index outside the row: check_range reports the fault
        row_loss[i] = nan("");
        return;
    }
    T peak = z[0];
    for (int j = 1; j < cols; ++j) peak = z[j] > peak ? z[j] : peak;
    double norm = 0;
    for (int j = 0; j < cols; ++j) { g[j] = exp(z[j] - peak); norm += g[j]; }
    row_loss[i] = log(norm) - (double)(z[label] - peak);
    for (int j = 0; j < cols; ++j) g[j] /= (T)norm;  // the reference's order: (p - onehot) / n
    g[label] -= 1;
    for (int j = 0; j < cols; ++j) g[j] /= (T)rows;
}
"""

_CORRECT_ROWS = r"""
template <typename T>
__global__ void correct_rows(const T* logits, const long long* labels, int* correct, int rows, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per row, as numba's loop: argmax, NaN, label
    if (i >= rows) return;
    const T* z = logits + (long long)i * cols;
    int best = 0;
    bool has_nan = false;
    for (int j = 0; j < cols; ++j) {
        has_nan |= z[j] != z[j];
        if (z[j] > z[best]) best = j;  // strictly greater: a tie goes to the first, as argmax's
    }
    correct[i] = !has_nan && best == labels[i];
}
"""

_CHECK_RANGE = r"""
__global__ void check_range(const long long* values, long long stop, int n, int* fault, int code) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && (values[i] < 0 || values[i] >= stop)) *fault = code;  // every writer writes the same code
}
"""


# ElementwiseKernel specs: (inputs, outputs, body), one element per thread, broadcast by CuPy.
_ADD_BIAS_ACTIVATE = (
    "T b, int32 activation",
    "T y",
    f"T v = y + b; y = (activation == {activation_code('relu')} && v < 0) ? (T)0 : v;",
)
_SGD_UPDATE = (
    "T grad, T lr, T momentum, bool nesterov, T weight_decay",
    "T param, T velocity",
    """T step = grad;
       if (weight_decay != 0) step += weight_decay * param;
       if (momentum != 0) {
           velocity = velocity * momentum + step;
           step = nesterov ? step + momentum * velocity : velocity;
       }
       param -= lr * step;""",
)


# The raw kernels' source, and each kernel by the name CuPy looks it up by (a template's for
# each dtype), which is all a kernel's signature needs beside its source.
RAW_SOURCE = ACTIVATION_CODES + _ACTIVATION_GRAD_AND_SUM_ROWS + _SOFTMAX_CROSS_ENTROPY + _CORRECT_ROWS + _CHECK_RANGE
_TEMPLATES = ("activation_grad_and_sum_row_blocks", "sum_rows", "softmax_cross_entropy", "correct_rows")
RAW_KERNELS = [f"{kernel}<{t}>" for kernel in _TEMPLATES for t in ("float", "double")] + ["check_range"]
ELEMENTWISE_KERNELS = {"add_bias_activate": _ADD_BIAS_ACTIVATE, "sgd_update": _SGD_UPDATE}


@functools.cache
def _kernels(cupy):
    """The fused kernels, built on first use; keyed by the cupy module so that a stand-in
    (the tests' CPU emulation of CuPy's kernel API) gets kernels of its own."""
    module = cupy.RawModule(code=RAW_SOURCE, options=("--std=c++14",), name_expressions=RAW_KERNELS)
    kernels = {name: cupy.ElementwiseKernel(*spec, f"xpnet_{name}") for name, spec in ELEMENTWISE_KERNELS.items()}
    return {**kernels, "module": module}


class CupyBackend(Backend):
    name = "cupy"
    eval_rows = 16384  # MNIST's validation or test split in one pass: launches, not rows, cost here

    def __init__(self, xp=None, gemm=None):
        """xp is CuPy; the tests pass their CPU emulation of CuPy's kernel API instead. gemm(a, b,
        out), where given, does the matrix products (cupy_graphs passes one that can be captured)."""
        if xp is None:
            import cupy as xp
        self.xp, self._gemm = xp, gemm
        # Range checks run on the device and are read with the next read from it: an int the
        # failing check sets, and the (name, stop) of each check since the last read.
        self._fault = xp.zeros(1, numpy.int32)
        self._pending_checks = []

    @staticmethod
    def check_available():
        """Raise BackendUnavailable saying whether CuPy or a GPU is missing, and the fix."""
        try:
            import cupy
        except ImportError:
            raise BackendUnavailable(f"backend 'cupy' needs CuPy, which is not installed: {INSTALL_HINT}") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise BackendUnavailable(
                f"backend 'cupy': CuPy is installed but no usable GPU answered ({exc}); "
                "check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --backend numba"
            ) from None
        if count == 0:
            raise BackendUnavailable(
                "backend 'cupy': CuPy is installed but no usable GPU answered (0 devices visible); "
                "check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --backend numba"
            )

    def _launch(self, name, n_threads, args, dtype=None):
        """Run raw kernel name (name<float or double> for a dtype) with one thread per item."""
        if dtype is not None:
            name = f"{name}<{'float' if dtype == numpy.float32 else 'double'}>"
        kernel = _kernels(self.xp)["module"].get_function(name)
        block = 128
        kernel((max(1, (n_threads + block - 1) // block),), (block,), args)

    # -- range checks, deferred: reading their result at once would make every step wait --------
    def _check_range(self, name, values, stop):
        self._pending_checks.append((name, stop))
        values = self.xp.ascontiguousarray(values, dtype=numpy.int64)
        code = numpy.int32(len(self._pending_checks))
        self._launch(
            "check_range", values.size, (values, numpy.int64(stop), numpy.int32(values.size), self._fault, code)
        )

    def _raise_faults(self):
        if not self._pending_checks:
            return
        code = int(self.xp.asnumpy(self._fault)[0])
        pending, self._pending_checks = self._pending_checks, []
        if code:
            self._fault[...] = 0
            name, stop = pending[code - 1]
            raise ArgumentError(f"{name} must lie in [0, {stop}), got a value outside it (found on the GPU)")

    def to_numpy(self, array):
        self._raise_faults()
        return self.xp.asnumpy(array) if isinstance(array, self.xp.ndarray) else numpy.array(array, copy=True)

    def synchronize(self):
        self.xp.cuda.get_current_stream().synchronize()
        self._raise_faults()

    def prepare(self, dtype):
        """Compile the fused kernels (or load them from CuPy's disk cache) outside any timing."""
        start = time.perf_counter()
        x = self.xp.ones((2, 3), dtype)
        labels = self.xp.zeros(2, numpy.int64)
        y = self.linear_forward(x, x, self.xp.zeros(2, dtype), "relu")
        self.linear_backward(x, x, y, activation="relu", output=y)
        self.softmax_cross_entropy(y, labels)
        self.count_correct(y, labels)
        self.sgd_update(x, self.xp.zeros_like(x), 0.1)
        self.synchronize()
        return time.perf_counter() - start

    # The compiled path's class: the tests' CPU emulation, which has no streams to capture, swaps in
    # one whose graphs replay the chunk's Python.
    _graph_steps = cupy_graphs.GraphSteps

    def compile_steps(self, model, optimizer, data, batch_size):
        """Chunks of steps captured as CUDA graphs (cupy_graphs.GraphSteps), which gather from
        data.x, on the device (data.images are on the host), where they lower the run."""
        problem = cupy_graphs.lowering_problem(model, optimizer)
        if problem is not None:
            return Declined(f"CuPy's CUDA graphs do not run this: {problem}")
        return self._graph_steps(self, model, optimizer, data, batch_size)

    # -- ops -------------------------------------------------------------------------------
    def _contiguous_output(self, out):
        """out itself when the raw kernels can write it, else a contiguous stand-in to copy back."""
        return out if out.flags.c_contiguous else self.xp.empty(out.shape, out.dtype)

    def _matmul(self, a, b, out):
        """out = a @ b, through gemm where given."""
        return self.xp.matmul(a, b, out=out) if self._gemm is None else self._gemm(a, b, out)

    def _linear_forward(self, x, W, b, activation, out):
        self._matmul(x, W.T, out)
        _kernels(self.xp)["add_bias_activate"](b, numpy.int32(activation_code(activation)), out)
        return out

    def _linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x, activation, output, grad_z):
        rows, cols = grad_y.shape
        identity = activation == "identity"
        contiguous = self.xp.ascontiguousarray
        grad_y = contiguous(grad_y)
        z, b = grad_y if identity else self._contiguous_output(grad_z), self._contiguous_output(grad_b)
        block_rows = max(1, math.isqrt(rows))
        blocks = -(-rows // block_rows)
        block_sums = self.xp.empty((blocks, cols), grad_y.dtype)
        code = numpy.int32(activation_code(activation))
        args = (grad_y, grad_y if identity else contiguous(output), code, z, block_sums)
        dims = (numpy.int32(rows), numpy.int32(cols), numpy.int32(block_rows))
        self._launch("activation_grad_and_sum_row_blocks", blocks * cols, (*args, *dims), grad_y.dtype)
        self._launch("sum_rows", cols, (block_sums, b, numpy.int32(blocks), numpy.int32(cols)), grad_y.dtype)
        if not identity and z is not grad_z:
            grad_z[...] = z
        if b is not grad_b:
            grad_b[...] = b
        self._matmul(z.T, x, grad_W)
        if grad_x is not None:
            self._matmul(z, W, grad_x)

    def _softmax_cross_entropy(self, logits, labels, grad_out):
        rows, cols = logits.shape
        grad = self._contiguous_output(grad_out)
        row_loss = self.xp.empty(rows, numpy.float64)
        labels = self.xp.ascontiguousarray(labels, dtype=numpy.int64)
        args = (self.xp.ascontiguousarray(logits), labels, grad, row_loss, numpy.int32(rows), numpy.int32(cols))
        self._launch("softmax_cross_entropy", rows, args, logits.dtype)
        if grad is not grad_out:
            grad_out[...] = grad
        return row_loss.mean().astype(logits.dtype)

    def _count_correct(self, logits, labels):
        """One kernel marks each row, one sum counts them (xp code takes seven kernels)."""
        rows, cols = logits.shape
        correct = self.xp.empty(rows, numpy.int32)
        labels = self.xp.ascontiguousarray(labels, dtype=numpy.int64)
        args = (self.xp.ascontiguousarray(logits), labels, correct, numpy.int32(rows), numpy.int32(cols))
        self._launch("correct_rows", rows, args, logits.dtype)
        return correct.sum(dtype=numpy.int64)

    def _sgd_update(self, param, grad, lr, velocity, momentum, nesterov, weight_decay):
        """One fused kernel; CuPy's elementwise kernels take any strides. lr may be a 0-d device
        array of param's dtype, which a captured step reads at each replay."""
        cast = param.dtype.type
        if velocity is None:  # the kernel's velocity output is then a dummy it never writes
            velocity, momentum = param, 0.0
        lr = lr if isinstance(lr, self.xp.ndarray) else cast(lr)
        _kernels(self.xp)["sgd_update"](grad, lr, cast(momentum), nesterov, cast(weight_decay), param, velocity)
