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

from xpnet.backends import cupy_graphs, cupy_head, deform, philox
from xpnet.backends.base import ACTIVATIONS, INV_SQRT_2PI, SQRT_HALF, Backend, Declined, activation_code
from xpnet.backends.cupy_deform import DEFORM_SOURCE, PHILOX
from xpnet.errors import ArgumentError, BackendUnavailable

INSTALL_HINT = (
    "pip install 'xpnet[cuda12]' for a CUDA 12 driver or 'xpnet[cuda13]' for CUDA 13 "
    "(nvidia-smi shows the driver's CUDA version)"
)

# Each activation's code, as the kernels compare them (base.activation_code), and GELU's constants.
ACTIVATION_CODES = "".join(f"#define ACTIVATION_{name.upper()} {activation_code(name)}\n" for name in ACTIVATIONS)
ACTIVATION_CODES += f"#define SQRT_HALF {SQRT_HALF!r}\n#define INV_SQRT_2PI {INV_SQRT_2PI!r}\n"

# Each activation's forward pass (GELU's is add_bias_gelu) and its derivative from the output y
# (GELU's from the pre-activation z), as device functions the kernels share.
_ACTIVATION_FUNCTIONS = r"""
template <typename T>
__device__ T activate(T v, int activation) {
    if (activation == ACTIVATION_RELU) return v < 0 ? (T)0 : v;
    if (activation == ACTIVATION_TANH) return tanh(v);
    if (activation == ACTIVATION_SIGMOID) return tanh(v * (T)0.5) * (T)0.5 + (T)0.5;
    return v;
}

template <typename T>
__device__ T activation_grad(T g, T y, int activation) {
    if (activation == ACTIVATION_RELU) return y > 0 ? g : (T)0;
    if (activation == ACTIVATION_TANH) return (1 - y * y) * g;
    if (activation == ACTIVATION_SIGMOID) return (1 - y) * y * g;
    if (activation == ACTIVATION_GELU) {  // y is the pre-activation z here
        T cdf = (1 + erf(y * (T)SQRT_HALF)) * (T)0.5;
        T pdf = exp(y * y * (T)-0.5) * (T)INV_SQRT_2PI;
        return g * (cdf + pdf * y);
    }
    return g;
}
"""

# The bias gradient sums a column over every row, in one kernel: a block takes 32 columns, and
# each of its 16 lanes of 32 threads every 16th row (32 consecutive columns: coalesced reads),
# masking the gradient by the activation as it goes; then the first lane adds the 16 lanes' sums
# in lane order, so the result is deterministic. One graph node a layer; it replaced two passes
# (bench/results-gpu-h200.md says what each cost).
SUM_COLUMNS, SUM_LANES = 32, 16
_ACTIVATION_GRAD_AND_SUM_ROWS = r"""
#define SUM_COLUMNS 32
#define SUM_LANES 16
template <typename T>
__global__ void activation_grad_and_sum_rows(const T* grad_y, const T* output, int activation, T* grad_z, T* sums,
                                             int rows, int cols) {
    __shared__ T partial[SUM_LANES][SUM_COLUMNS];
    int column = threadIdx.x % SUM_COLUMNS, lane = threadIdx.x / SUM_COLUMNS;
    int j = blockIdx.x * SUM_COLUMNS + column;
    T sum = 0;
    if (j < cols) {  // no return: every thread of the block must reach the barrier
        for (int i = lane; i < rows; i += SUM_LANES) {
            long long k = (long long)i * cols + j;
            T g = activation_grad(grad_y[k], output[k], activation);
            if (activation != ACTIVATION_IDENTITY) grad_z[k] = g;
            sum += g;
        }
    }
    partial[lane][column] = sum;
    __syncthreads();
    if (lane == 0 && j < cols) {
        T total = 0;
        for (int l = 0; l < SUM_LANES; ++l) total += partial[l][column];
        sums[j] = total;
    }
}
"""

# The loss of a batch in one kernel and one block: each thread takes every LOSS_THREADS-th row
# (rows are short: 10 classes), writes its gradient and sums its losses, and the block adds the
# sums in a fixed tree, so the mean is deterministic. One graph node, where a per-row kernel,
# CuPy's mean, a cast and a copy were four (bench/results-gpu-h200.md, call 9's profile).
LOSS_THREADS = 512
_SOFTMAX_CROSS_ENTROPY = r"""
#define LOSS_THREADS 512
template <typename T>
__global__ void softmax_cross_entropy(const T* logits, const long long* labels, T* grad, T* loss, int rows, int cols) {
    __shared__ double partial[LOSS_THREADS];
    double sum = 0;
    for (int i = threadIdx.x; i < rows; i += LOSS_THREADS) {
        const T* z = logits + (long long)i * cols;
        T* g = grad + (long long)i * cols;
        long long label = labels[i];
        if (label < 0 || label >= cols) {  // never index outside the row: check_range reports the fault
            sum = nan("");
            continue;
        }
        T peak = z[0];
        for (int j = 1; j < cols; ++j) peak = z[j] > peak ? z[j] : peak;
        double norm = 0;
        for (int j = 0; j < cols; ++j) { g[j] = exp(z[j] - peak); norm += g[j]; }
        sum += log(norm) - (double)(z[label] - peak);
        for (int j = 0; j < cols; ++j) g[j] /= (T)norm;  // the reference's order: (p - onehot) / n
        g[label] -= 1;
        for (int j = 0; j < cols; ++j) g[j] /= (T)rows;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = LOSS_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) *loss = (T)(partial[0] / rows);
}
"""

# A model's whole SGD update in one kernel (a graph node, not one per array): one thread per
# element of all the arrays, each finding its array in the table of their ends (a handful: a
# scan), and each array's address in a table uploaded once (CupyBackend._device_table). The
# operations are sgd_update's, in its order.
_SGD_UPDATE_ALL = r"""
template <typename T>
__global__ void sgd_update_all(const unsigned long long* params, const unsigned long long* grads,
                               const unsigned long long* velocities, const long long* ends, int count,
                               const T* lr, T momentum, bool nesterov, T weight_decay) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (count <= 0 || k >= ends[count - 1]) return;
    int a = 0;
    while (k >= ends[a]) ++a;
    long long i = k - (a > 0 ? ends[a - 1] : 0);
    T* param = (T*)params[a];
    T step = ((const T*)grads[a])[i];
    if (weight_decay != 0) step += weight_decay * param[i];
    if (momentum != 0) {
        T* velocity = (T*)velocities[a];
        velocity[i] = velocity[i] * momentum + step;
        step = nesterov ? step + momentum * velocity[i] : velocity[i];
    }
    param[i] -= *lr * step;
}
"""

# A batch's images and labels gathered by one kernel (a graph node, not two): one thread per
# pixel; the first of each row also copies its label. The rows are the trainer's permutation.
_TAKE_BATCH = r"""
template <typename T>
__global__ void take_batch(const T* images, const long long* labels, const long long* rows, T* batch_images,
                           long long* batch_labels, int n, int cols) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)n * cols) return;
    long long i = k / cols, j = k % cols, row = rows[i];
    batch_images[k] = images[row * cols + j];
    if (j == 0) batch_labels[i] = labels[row];
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

# Dropout's mask, one thread per Philox counter (four elements).
_DROPOUT = (
    PHILOX
    + r"""
template <typename T>
__global__ void dropout(const T* x, unsigned threshold, T scale, unsigned step, unsigned layer, unsigned epoch,
                        unsigned key0, unsigned key1, T* out, T* mask, long long n) {
    long long block = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (block * 4 >= n) return;
    unsigned words[4] = {(unsigned)block, step, layer, epoch};
    philox4x32_10(words, key0, key1);
    for (int lane = 0; lane < 4 && block * 4 + lane < n; ++lane) {
        long long e = block * 4 + lane;
        mask[e] = words[lane] >= threshold ? scale : (T)0;
        out[e] = x[e] * mask[e];
    }
}
"""
)

_CHECK_RANGE = r"""
__global__ void check_range(const long long* values, long long stop, int n, int* fault, int code) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && (values[i] < 0 || values[i] >= stop)) *fault = code;  // every writer writes the same code
}
"""


# ElementwiseKernel specs: (inputs, outputs, body), one element per thread, broadcast by CuPy.
_ADD_BIAS_ACTIVATE = ("T b, int32 activation", "T y", "y = activate(y + b, activation)")
_ADD_BIAS_GELU = (  # as Backend._gelu computes it; z and y are two arrays (prediction's z a temporary)
    "T b",
    "T z, T y",
    f"""T v = z + b;
       z = v;
       y = v * (T)0.5 * ((T)1 + erf(v * (T){SQRT_HALF!r}));""",
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


DEFORM_THREADS = 256  # a block's threads for one image's pixels

# The raw kernels' source, and each kernel by the name CuPy looks it up by (a template's for
# each dtype), which is all a kernel's signature needs beside its source.
RAW_SOURCE = _TAKE_BATCH + _SGD_UPDATE_ALL + _CORRECT_ROWS + _DROPOUT + _CHECK_RANGE + cupy_head.HEAD_RAW_SOURCE
_TEMPLATES = ("take_batch", "sgd_update_all", "correct_rows", "dropout", *cupy_head.RAW_TEMPLATES)
RAW_KERNELS = [f"{kernel}<{t}>" for kernel in _TEMPLATES for t in ("float", "double")] + ["check_range"]
# Kernels whose threads share memory and wait for each other (__syncthreads), in a module of
# their own: the CPU emulation runs such a module's threads as coroutines, the others one by one.
BLOCK_SOURCE = ACTIVATION_CODES + _ACTIVATION_FUNCTIONS + _ACTIVATION_GRAD_AND_SUM_ROWS + _SOFTMAX_CROSS_ENTROPY
BLOCK_SOURCE += DEFORM_SOURCE + cupy_head.HEAD_BLOCK_SOURCE
_BLOCK_TEMPLATES = ("activation_grad_and_sum_rows", "softmax_cross_entropy", "deform_rows", *cupy_head.BLOCK_TEMPLATES)
BLOCK_KERNELS = [f"{kernel}<{t}>" for kernel in _BLOCK_TEMPLATES for t in ("float", "double")]
ELEMENTWISE_PREAMBLE = ACTIVATION_CODES + _ACTIVATION_FUNCTIONS  # what their bodies call
ELEMENTWISE_KERNELS = {
    "add_bias_activate": _ADD_BIAS_ACTIVATE,
    "add_bias_gelu": _ADD_BIAS_GELU,
    "sgd_update": _SGD_UPDATE,
}


def _instance(name, dtype):
    """A template kernel's name for a dtype (name<float> or name<double>); name itself for None."""
    return name if dtype is None else f"{name}<{'float' if dtype == numpy.float32 else 'double'}>"


@functools.cache
def _kernels(cupy):
    """The fused kernels, built on first use; keyed by the cupy module so that a stand-in
    (the tests' CPU emulation of CuPy's kernel API) gets kernels of its own."""
    options = ("--std=c++14",)
    module = cupy.RawModule(code=RAW_SOURCE, options=options, name_expressions=RAW_KERNELS)
    block_module = cupy.RawModule(code=BLOCK_SOURCE, options=options, name_expressions=BLOCK_KERNELS)
    kernels = {
        name: cupy.ElementwiseKernel(*spec, f"xpnet_{name}", preamble=ELEMENTWISE_PREAMBLE)
        for name, spec in ELEMENTWISE_KERNELS.items()
    }
    return {**kernels, "module": module, "block_module": block_module}


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
        self._tables = {}  # small device arrays of host values (_device_table), by their values

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
        kernel = _kernels(self.xp)["module"].get_function(_instance(name, dtype))
        block = 128
        kernel((max(1, (n_threads + block - 1) // block),), (block,), args)

    def _launch_blocks(self, name, blocks, threads, args, dtype):
        """Run a kernel of the block module as `blocks` blocks of `threads` threads."""
        _kernels(self.xp)["block_module"].get_function(_instance(name, dtype))((blocks,), (threads,), args)

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
        self.linear_forward(x, x, self.xp.zeros(2, dtype), "gelu", pre_out=self.xp.empty_like(y))
        self.softmax_cross_entropy(y, labels)
        self.count_correct(y, labels)
        self.sgd_update(x, self.xp.zeros_like(x), 0.1)
        self.dropout(x, 0.5, philox.Draw(0, 0, 0))
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

    def _linear_forward(self, x, W, b, activation, out, pre_out):
        if activation == "gelu":
            z = self.xp.empty_like(out) if pre_out is None else pre_out  # prediction's, a temporary
            self._matmul(x, W.T, z)
            _kernels(self.xp)["add_bias_gelu"](b, z, out)
            return out
        self._matmul(x, W.T, out)
        _kernels(self.xp)["add_bias_activate"](b, numpy.int32(activation_code(activation)), out)
        return out

    def _linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x, activation, saved, grad_z):
        rows, cols = grad_y.shape
        identity = activation == "identity"
        contiguous = self.xp.ascontiguousarray
        grad_y = contiguous(grad_y)
        z, b = grad_y if identity else self._contiguous_output(grad_z), self._contiguous_output(grad_b)
        code = numpy.int32(activation_code(activation))
        args = (grad_y, grad_y if identity else contiguous(saved), code, z, b, numpy.int32(rows), numpy.int32(cols))
        blocks = -(-cols // SUM_COLUMNS)
        self._launch_blocks("activation_grad_and_sum_rows", blocks, SUM_COLUMNS * SUM_LANES, args, grad_y.dtype)
        if not identity and z is not grad_z:
            grad_z[...] = z
        if b is not grad_b:
            grad_b[...] = b
        self._matmul(z.T, x, grad_W)
        if grad_x is not None:
            self._matmul(z, W, grad_x)

    def _softmax_cross_entropy(self, logits, labels, grad_out, loss_out=None):
        """loss_out, where given, is a 1-element array of the logits' dtype the mean is written to
        (a captured step's slot in its chunk's losses)."""
        rows, cols = logits.shape
        grad = self._contiguous_output(grad_out)
        loss = self.xp.empty(1, logits.dtype) if loss_out is None else loss_out
        labels = self.xp.ascontiguousarray(labels, dtype=numpy.int64)
        args = (self.xp.ascontiguousarray(logits), labels, grad, loss, numpy.int32(rows), numpy.int32(cols))
        self._launch_blocks("softmax_cross_entropy", 1, LOSS_THREADS, args, logits.dtype)
        if grad is not grad_out:
            grad_out[...] = grad
        return loss.reshape(())

    def _fused_head(self, head, scratch):
        """The last hidden layer's bias and activation, the output layer, the loss and their
        gradients in three kernels (cupy_head.py), for the captured step: head is a
        cupy_head.HeadArrays, scratch the cupy_head.workspace of its batch. Shapes are checked
        here; the labels' range is the caller's to check (a label outside gives its row a NaN
        loss, never a stray read)."""
        cupy_head.check_head(head, scratch)
        (rows, width), classes, dtype = head.hidden.shape, head.W.shape[0], head.hidden.dtype
        sizes = tuple(map(numpy.int32, (rows, width, classes)))
        args = (head.hidden, head.hidden_b, numpy.int32(activation_code(head.activation)), head.W, head.b)
        args += (head.labels, head.logits, head.grad_logits, head.grad_hidden, head.grad_hidden_z, scratch.row_losses)
        self._launch_blocks("head_rows", rows, cupy_head.HEAD_ROW_THREADS, (*args, *sizes), dtype)
        tiles, slices = -(-(width + 1) // cupy_head.HEAD_COLUMNS), cupy_head.slices(rows)
        args = (head.hidden, head.grad_logits, head.grad_hidden_z, scratch.row_losses, scratch.sums)
        threads = cupy_head.HEAD_LANES * cupy_head.HEAD_COLUMNS
        self._launch_blocks("head_slice_sums", tiles * slices, threads, (*args, scratch.slice_losses, *sizes), dtype)
        args = (scratch.sums, scratch.slice_losses, head.grad_W, head.grad_b, head.grad_hidden_b, head.loss)
        self._launch("head_finish", (classes + 1) * (width + 1) + 1, (*args, numpy.int32(slices), *sizes), dtype)

    def _dropout(self, x, threshold, scale, draw, out, mask):
        if not (x.flags.c_contiguous and out.flags.c_contiguous and mask.flags.c_contiguous):
            return super()._dropout(x, threshold, scale, draw, out, mask)
        words = map(numpy.uint32, (threshold, draw.step, draw.layer, draw.epoch, *draw.key()))
        threshold, step, layer, epoch, k0, k1 = words
        args = (x, threshold, scale, step, layer, epoch, k0, k1, out, mask, numpy.int64(x.size))
        self._launch("dropout", -(-x.size // 4), args, x.dtype)
        return out

    def _deform_rows(self, source, rows, spec, seed, epoch, background, out):
        """One block an image (cupy_deform.py), its Gaussian's taps in a device table."""
        if not len(rows):
            return out
        side, target = math.isqrt(source.shape[1]), self._contiguous_output(out)
        weights = self._device_table(deform.gaussian_weights(spec.sigma), numpy.float64)
        rows = self.xp.ascontiguousarray(rows, dtype=numpy.int64)
        ranges = map(numpy.float64, deform.kernel_ranges(spec, side))
        seed_words = map(numpy.uint32, philox.Draw(seed, epoch, 0).key())
        args = (self.xp.ascontiguousarray(source), rows, numpy.int64(len(source)), numpy.int32(side), *ranges)
        args += (weights, numpy.int32(len(weights)), *seed_words, numpy.uint32(epoch), numpy.float64(background))
        args += (target,)
        self._launch_blocks("deform_rows", len(rows), DEFORM_THREADS, args, source.dtype)
        if target is not out:
            out[...] = target
        return out

    def _take_batch(self, images, labels, rows, batch_images, batch_labels):
        """batch_images[i], batch_labels[i] = images[rows[i]], labels[rows[i]], in one kernel, for
        contiguous arrays; rows are not checked (the trainer's permutation: cupy_graphs says why)."""
        n, cols = batch_images.shape
        args = (images, labels, rows, batch_images, batch_labels, numpy.int32(n), numpy.int32(cols))
        self._launch("take_batch", n * cols, args, images.dtype)

    def _count_correct(self, logits, labels):
        """One kernel marks each row, one sum counts them (xp code takes seven kernels)."""
        rows, cols = logits.shape
        correct = self.xp.empty(rows, numpy.int32)
        labels = self.xp.ascontiguousarray(labels, dtype=numpy.int64)
        args = (self.xp.ascontiguousarray(logits), labels, correct, numpy.int32(rows), numpy.int32(cols))
        self._launch("correct_rows", rows, args, logits.dtype)
        return correct.sum(dtype=numpy.int64)

    @staticmethod
    def _address(array):
        return array.data.ptr

    def _device_table(self, values, dtype):
        """A device array of these host values, uploaded at the first call with them (before a
        graph's capture: its warm-up step makes the call) and then reused: a capture may not upload."""
        key = (numpy.dtype(dtype).str, tuple(values))
        if key not in self._tables:
            if len(self._tables) >= 64:  # old models' tables: dropped, not kept forever
                self._tables.clear()
            self._tables[key] = self.xp.asarray(numpy.array(key[1], dtype))
        return self._tables[key]

    def _sgd_update_all(self, params, grads, lr, velocities, momentum, nesterov, weight_decay):
        """One kernel for every array where all are contiguous (a model's own are); else one
        per array. lr may be a 1-element device array, which a captured step reads at each replay."""
        arrays = [*params, *grads, *(v for v in velocities if v is not None)]
        if not params or not all(a.flags.c_contiguous for a in arrays):
            return super()._sgd_update_all(params, grads, lr, velocities, momentum, nesterov, weight_decay)
        dtype = params[0].dtype
        cast = dtype.type
        addresses = lambda arrays: self._device_table(map(self._address, arrays), numpy.uint64)  # noqa: E731
        tables = [addresses(params), addresses(grads)]
        tables.append(addresses(velocities) if momentum else tables[0])  # read only with momentum
        ends = numpy.cumsum([p.size for p in params])
        tables.append(self._device_table(ends, numpy.int64))
        lr = lr.reshape(1) if isinstance(lr, self.xp.ndarray) else self.xp.full(1, lr, dtype)
        args = (*tables, numpy.int32(len(params)), lr, cast(momentum), numpy.bool_(nesterov), cast(weight_decay))
        self._launch("sgd_update_all", int(ends[-1]), args, dtype)

    def _sgd_update(self, param, grad, lr, velocity, momentum, nesterov, weight_decay):
        """One fused kernel; CuPy's elementwise kernels take any strides. lr may be a 0-d device
        array of param's dtype, which a captured step reads at each replay."""
        cast = param.dtype.type
        if velocity is None:  # the kernel's velocity output is then a dummy it never writes
            velocity, momentum = param, 0.0
        lr = lr if isinstance(lr, self.xp.ndarray) else cast(lr)
        _kernels(self.xp)["sgd_update"](grad, lr, cast(momentum), nesterov, cast(weight_decay), param, velocity)
