"""CuPy backend: xp = cupy, matrix products through cuBLAS, the hot ops as fused CUDA kernels.

The data lives on the GPU: the trainer moves the training set once and gathers batches there,
and the loss and accuracy are summed on the device and read back once per epoch. CuPy
refuses implicit conversion to NumPy, so a stray host copy inside a step is an error, not a
slowdown. Kernels are built lazily (CuPy compiles at first launch and caches on disk), never
at import. TF32 is left off (CUPY_TF32 unset), so float32 products keep full precision and
the parity tests' float32 bounds hold.

This module imports without CuPy: CuPy is an optional extra and is imported when a
CupyBackend is made.
"""

import functools
import time

import numpy

from xpnet.backends.base import Backend
from xpnet.errors import BackendUnavailable

INSTALL_HINT = (
    "pip install 'xpnet[cuda12]' for a CUDA 12 driver or 'xpnet[cuda13]' for CUDA 13 "
    "(nvidia-smi shows the driver's CUDA version)"
)

_MASK_AND_SUM_ROWS = r"""
template <typename T>
__global__ void mask_and_sum_rows(T* grad_y, const T* relu_output, bool relu, T* grad_b, int rows, int cols) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per column: coalesced rows
    if (j >= cols) return;
    T sum = 0;
    for (int i = 0; i < rows; ++i) {
        int k = i * cols + j;
        if (relu && !(relu_output[k] > 0)) grad_y[k] = 0;
        sum += grad_y[k];
    }
    grad_b[j] = sum;
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
    T peak = z[0];
    for (int j = 1; j < cols; ++j) peak = z[j] > peak ? z[j] : peak;
    double norm = 0;
    for (int j = 0; j < cols; ++j) { g[j] = exp(z[j] - peak); norm += g[j]; }
    long long label = labels[i];
    row_loss[i] = log(norm) - (double)(z[label] - peak);
    for (int j = 0; j < cols; ++j) g[j] /= (T)norm;  // the reference's order: (p - onehot) / n
    g[label] -= 1;
    for (int j = 0; j < cols; ++j) g[j] /= (T)rows;
}
"""


# ElementwiseKernel specs: (inputs, outputs, body), one element per thread, broadcast by CuPy.
_ADD_BIAS_RELU = ("T b, bool relu", "T y", "T v = y + b; y = (relu && v < 0) ? (T)0 : v;")
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


@functools.cache
def _kernels(cupy):
    """The fused kernels, built on first use; keyed by the cupy module so that a stand-in
    (the tests' CPU emulation of CuPy's kernel API) gets kernels of its own."""
    names = [f"{kernel}<{t}>" for kernel in ("mask_and_sum_rows", "softmax_cross_entropy") for t in ("float", "double")]
    module = cupy.RawModule(
        code=_MASK_AND_SUM_ROWS + _SOFTMAX_CROSS_ENTROPY, options=("--std=c++14",), name_expressions=names
    )
    return {
        "add_bias_relu": cupy.ElementwiseKernel(*_ADD_BIAS_RELU, "xpnet_add_bias_relu"),
        "sgd_update": cupy.ElementwiseKernel(*_SGD_UPDATE, "xpnet_sgd_update"),
        "module": module,
    }


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self):
        import cupy

        self.xp = cupy

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

    def _launch(self, name, dtype, n_threads, args):
        """Run raw kernel name<float or double> with one thread per row or column."""
        c_type = "float" if dtype == numpy.float32 else "double"
        kernel = _kernels(self.xp)["module"].get_function(f"{name}<{c_type}>")
        block = 128
        kernel(((n_threads + block - 1) // block,), (block,), args)

    def to_numpy(self, array):
        return self.xp.asnumpy(array)

    def synchronize(self):
        self.xp.cuda.get_current_stream().synchronize()

    def prepare(self, dtype):
        """Compile the fused kernels (or load them from CuPy's disk cache) outside any timing."""
        start = time.perf_counter()
        x = self.xp.ones((2, 3), dtype)
        labels = self.xp.zeros(2, numpy.int64)
        y = self.linear_forward(x, x, self.xp.zeros(2, dtype), relu=True)
        self.linear_backward(x, x, y, self.xp.empty((2, 3), dtype), self.xp.empty(2, dtype), relu_output=y)
        self.softmax_cross_entropy(y, labels, self.xp.empty_like(y))
        self.sgd_update(x, self.xp.zeros_like(x), 0.1)
        self.synchronize()
        return time.perf_counter() - start

    def linear_forward(self, x, W, b, relu=False, out=None):
        out = self.xp.matmul(x, W.T, out=out)
        _kernels(self.xp)["add_bias_relu"](b, relu, out)
        return out

    def linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x=None, relu_output=None):
        rows, cols = grad_y.shape
        relu = relu_output is not None
        args = (
            grad_y,
            relu_output if relu else grad_y,
            numpy.bool_(relu),
            grad_b,
            numpy.int32(rows),
            numpy.int32(cols),
        )
        self._launch("mask_and_sum_rows", grad_y.dtype, cols, args)
        self.xp.matmul(grad_y.T, x, out=grad_W)
        if grad_x is not None:
            self.xp.matmul(grad_y, W, out=grad_x)
        return grad_x

    def softmax_cross_entropy(self, logits, labels, grad_out=None):
        rows, cols = logits.shape
        grad = self.xp.empty_like(logits) if grad_out is None else grad_out
        row_loss = self.xp.empty(rows, numpy.float64)
        labels = labels.astype(numpy.int64, copy=False)
        self._launch(
            "softmax_cross_entropy",
            logits.dtype,
            rows,
            (logits, labels, grad, row_loss, numpy.int32(rows), numpy.int32(cols)),
        )
        return row_loss.mean().astype(logits.dtype), grad

    def sgd_update(self, param, grad, lr, velocity=None, momentum=0.0, nesterov=False, weight_decay=0.0):
        """One fused kernel; grad is left untouched."""
        cast = param.dtype.type
        if velocity is None:  # the kernel's velocity output is then a dummy it never writes
            velocity, momentum = param, 0.0
        _kernels(self.xp)["sgd_update"](grad, cast(lr), cast(momentum), nesterov, cast(weight_decay), param, velocity)
