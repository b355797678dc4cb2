"""The CuPy backend's compiled path: a trainer's steps captured as CUDA graphs and replayed.

Op by op a step is some twenty launches through Python, and at MNIST's sizes a kernel can finish
sooner than Python launches the next. A graph records an epoch of steps once and replays it in
one call. Every array keeps its address (buffers of this object and a memory pool of its own);
the chunk's rows and rates are copied in before a replay; the products call cuBLAS through
ctypes (CublasGemm), since CuPy refuses cuBLAS calls during capture. The output layer is the
exception: it, the loss, the last hidden layer's bias and activation and their gradients are
three kernels of cupy_head.py where the model has a hidden layer and at most 16 classes (eight
kernels with cuBLAS, whose products of ten columns are its slowest). Nothing inside a graph
checks: the labels are checked once here, and the order is the trainer's permutation of the
rows. Where capture fails, a warning says why and the same steps run uncaptured. The whole
story: docs/design.md, "CuPy's CUDA graphs".
"""

import ctypes
import warnings

import numpy

from xpnet.backends import cupy_head, steps
from xpnet.nn.optim import SGD

OP_N, OP_T = 0, 1  # cublasOperation_t
WORKSPACE_BYTES = 32 * 2**20  # cuBLAS's advice for Hopper; set before capture so none is allocated in it
MAX_GRAPHS = 8  # distinct chunk shapes kept; an epoch is one (or two, past GRAPH_STEPS)
# Steps per graph at most: a whole epoch of MNIST at batch 128 (391 steps, about 9,000 nodes) is
# one graph; online learning's 60,000 steps an epoch would be over a million nodes.
GRAPH_STEPS = 1024


def _cublas_library():
    """The libcublas CuPy has loaded (so handles made through CuPy are valid in it)."""
    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load cuBLAS
    with open("/proc/self/maps") as maps:
        loaded = sorted({line.split()[-1] for line in maps if "/libcublas.so" in line})
    for name in [*loaded, "libcublas.so.13", "libcublas.so.12", "libcublas.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcublas is not loaded in this process and was not found by name")


class CublasGemm:
    """gemm(a, b, out): out = a @ b through cuBLAS's sgemm or dgemm on a handle of its own,
    bound to one stream, so that it may be called while that stream is captured."""

    def __init__(self, stream):
        import cupy
        from cupy_backends.cuda.libs import cublas

        library = _cublas_library()
        pointer, flag = ctypes.c_void_p, ctypes.c_int
        self.routines = {}
        for dtype, name, real in ((numpy.float32, "cublasSgemm_v2", ctypes.c_float),
                                  (numpy.float64, "cublasDgemm_v2", ctypes.c_double)):  # fmt: skip
            routine = getattr(library, name)
            # handle, op_a, op_b, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc
            routine.argtypes = [pointer, flag, flag, flag, flag, flag, pointer, pointer, flag, pointer, flag, pointer]
            routine.argtypes += [pointer, flag]
            routine.restype = flag
            self.routines[numpy.dtype(dtype)] = (routine, ctypes.byref(real(1)), ctypes.byref(real(0)))
        self._cublas = cublas
        self.handle = cublas.create()
        cublas.setStream(self.handle, stream.ptr)
        self.workspace = cupy.empty(WORKSPACE_BYTES, numpy.uint8)
        set_workspace = getattr(library, "cublasSetWorkspace_v2", None)
        if set_workspace is not None:
            set_workspace.argtypes, set_workspace.restype = [pointer, pointer, ctypes.c_size_t], flag
            self._check(set_workspace(self.handle, self.workspace.data.ptr, WORKSPACE_BYTES), "cublasSetWorkspace")

    @staticmethod
    def _operand(array):
        """(op, leading dimension) that show row-major array's memory to column-major cuBLAS as array.T."""
        if array.flags.c_contiguous:
            return OP_N, array.shape[1]
        if array.flags.f_contiguous:  # the transpose of a C array, as W.T and grad_z.T are
            return OP_T, array.shape[0]
        raise ValueError("gemm takes C- or F-contiguous 2-D arrays")

    def __call__(self, a, b, out):
        # Row-major out = a @ b is column-major out.T = b.T @ a.T: cuBLAS gets b first.
        if not out.flags.c_contiguous:
            raise ValueError("gemm writes only C-contiguous outputs")
        (m, k), n = a.shape, b.shape[1]
        (op_a, lda), (op_b, ldb) = self._operand(a), self._operand(b)
        routine, one, zero = self.routines[out.dtype]
        status = routine(self.handle, op_b, op_a, n, m, k, one, b.data.ptr, ldb, a.data.ptr, lda, zero, out.data.ptr, n)
        self._check(status, "gemm")
        return out

    @staticmethod
    def _check(status, call):
        if status:
            raise RuntimeError(f"cuBLAS {call} failed with status {status}")

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle is not None:
            self._cublas.destroy(handle)


def lowering_problem(model, optimizer):
    """None where the graphs run this model and optimiser (the reference step's ops, captured);
    else why not."""
    return steps.lowering_problem(model, optimizer, (SGD,), steps.OUTPUT_ACTIVATIONS)


def step_buffers(backend, sizes, rows, dtype):
    """steps.StepBuffers of one step at one batch size, on the device."""
    per_layer = lambda: tuple(backend.empty((rows, size), dtype) for size in sizes[1:])  # noqa: E731
    inputs, labels = backend.empty((rows, sizes[0]), dtype), backend.empty((rows,), numpy.int64)
    return steps.StepBuffers(inputs, labels, per_layer(), per_layer(), per_layer())


class GraphSteps(steps.CompiledSteps):
    """A trainer's steps as replays of CUDA graphs (see the module's note)."""

    chunks_may_grow = False  # each chunk length is a CUDA graph of its own to capture

    def chunk_steps(self, steps_per_epoch):
        """A whole epoch per launch (up to GRAPH_STEPS): with a twentieth of one, the GPU waited
        between launches (4.25 us per kernel at batch 2048, where that is one step a graph:
        bench/results-gpu-h200.md, call 9). The progress bar moves once an epoch, and an epoch
        on the GPU is milliseconds."""
        return min(steps_per_epoch, GRAPH_STEPS)

    def __init__(self, backend, model, optimizer, data, batch_size):
        cupy = backend.xp
        self.cupy, self.backend, self.model, self.optimizer = cupy, backend, model, optimizer
        backend._check_range("labels", data.y, model.sizes[-1])  # raised by the next read from the device
        self.data = data
        self.batch_size, self.n_rows = batch_size, len(data.y)
        self.arrays = {}  # StepBuffers by batch size
        self.last = None  # the StepBuffers of the last step run
        self.graphs = {}  # by the batch sizes of a chunk's steps
        self.rows = self.lrs = self.losses = None  # the chunk's, sized by _make_room
        self._lrs_held = None  # the host values self.lrs holds, NaN where unknown
        self.failure = None  # why capture failed, once it has
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.ops = None  # the backend's ops with products that can be captured, made at the first capture
        # Whether a step's top layers are cupy_head's kernels, where head_problem is None; set it
        # False before the first run to time cuBLAS's products instead (bench/gpu_profile.py does).
        self.head_problem = cupy_head.head_problem(model.sizes, model.activation)
        self.fused_head = self.head_problem is None
        self.scratch = {}  # cupy_head.workspace by batch size

    # -- the step: the reference step's ops on this object's buffers -------------------------
    def _step(self, ops, buffers, rows, lr, loss_out):
        # The gather and the loss skip their ops' checks of rows and labels, which run on the GPU
        # and report at the next read (nothing a graph can replay): the labels were checked once
        # here, and the rows are the trainer's permutation.
        x, y = buffers.inputs, buffers.labels
        ops._take_batch(self.data.x, self.data.y, rows, x, y)
        layers, inputs = self.model.net.layers, [x, *buffers.outputs]
        below = len(layers) - 2 if self.fused_head else len(layers)  # the layers below the head's two
        for i, layer in enumerate(layers[:below]):
            ops.linear_forward(inputs[i], layer.W.value, layer.b.value, layer.activation, inputs[i + 1])
        if self.fused_head:
            self._head(ops, buffers, inputs, y, loss_out)
        else:
            ops._softmax_cross_entropy(inputs[-1], y, buffers.grads_y[-1], loss_out)
        for i in reversed(range(below)):
            layer, grad_x = layers[i], buffers.grads_y[i - 1] if i > 0 else None
            grad_y, grad_z, W, b = buffers.grads_y[i], buffers.grads_z[i], layer.W, layer.b
            ops.linear_backward(
                inputs[i], W.value, grad_y, W.grad, b.grad, grad_x, layer.activation, inputs[i + 1], grad_z
            )
        self.optimizer.apply(ops, lr)
        self.last = buffers

    def _head(self, ops, buffers, inputs, labels, loss_out):
        """The last hidden layer and the output layer, forward and back: the hidden layer's
        product, then cupy_head's kernels (its bias and activation, the output layer, the loss,
        the gradients down to the hidden layer's bias), then the hidden layer's gradient products.
        inputs are each layer's input and then the logits, as _step lists them."""
        k = len(self.model.net.layers) - 2  # the hidden layer's index
        hidden, output = self.model.net.layers[k:]
        x, product = inputs[k], inputs[k + 1]  # the product becomes the hidden layer's output
        ops._matmul(x, hidden.W.value.T, product)
        grad_z = buffers.grads_y[k] if hidden.activation == "identity" else buffers.grads_z[k]
        head = cupy_head.HeadArrays(
            hidden=product, hidden_b=hidden.b.value, activation=hidden.activation, W=output.W.value, b=output.b.value,
            labels=labels, logits=buffers.outputs[-1], grad_logits=buffers.grads_y[-1], grad_hidden=buffers.grads_y[k],
            grad_hidden_z=grad_z, grad_hidden_b=hidden.b.grad, grad_W=output.W.grad, grad_b=output.b.grad,
            loss=loss_out,
        )  # fmt: skip
        ops._fused_head(head, self.scratch[len(labels)])
        ops._matmul(grad_z.T, x, hidden.W.grad)
        if k > 0:
            ops._matmul(grad_z, hidden.W.value, buffers.grads_y[k - 1])

    def _chunk(self, ops, sizes):
        """The steps of a chunk, reading rows, lrs and writing losses at their positions."""
        offset = 0
        for s, size in enumerate(sizes):
            self._step(ops, self.arrays[size], self.rows[offset : offset + size], self.lrs[s], self.losses[s : s + 1])
            offset += size

    # -- buffers and capture --------------------------------------------------------------------
    def _make_room(self, sizes):
        """Buffers for a chunk of these batch sizes; growing them drops the graphs, which hold the old ones."""
        for size in set(sizes) - set(self.arrays):
            self.arrays[size] = step_buffers(self.backend, self.model.sizes, size, self.model.dtype)
            if self.fused_head:
                width, classes = self.model.sizes[-2:]
                self.scratch[size] = cupy_head.workspace(self.cupy, size, width, classes, self.model.dtype)
        if self.rows is None or len(self.rows) < sum(sizes) or len(self.lrs) < len(sizes):
            xp = self.cupy
            self.rows = xp.zeros(max(sum(sizes), 0 if self.rows is None else len(self.rows)), numpy.int64)
            self.lrs = xp.zeros(max(len(sizes), 0 if self.lrs is None else len(self.lrs)), self.model.dtype)
            self.losses = xp.empty(len(self.lrs), self.model.dtype)
            self.graphs.clear()
            self._lrs_held = numpy.full(len(self.lrs), numpy.nan, self.model.dtype)  # matches no rate

    def _capture(self, sizes):
        """The chunk's graph, after one uncaptured step of each batch size, whose update is undone."""
        cupy, ops = self.cupy, self.capturable_ops()
        optimizer = self.optimizer
        state = [p.value for p in optimizer.parameters] + [a for arrays in optimizer.state.values() for a in arrays]
        cupy.cuda.Device().synchronize()
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            saved = [array.copy() for array in state]
            try:
                self.rows[: sum(sizes)] = 0  # row 0 stands in for the rows: the warm-up reads valid memory
                for size in sorted(set(sizes)):
                    self._step(ops, self.arrays[size], self.rows[:size], self.lrs[0], self.losses[0:1])
            finally:
                for array, copy in zip(state, saved):
                    array[...] = copy
                self.stream.synchronize()
            graph = self._record(lambda: self._chunk(ops, sizes))
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[sizes] = graph
        return graph

    def _record(self, chunk):
        """The CUDA graph of chunk() on the capture stream: its launches recorded, not run."""
        self.stream.begin_capture()
        try:
            chunk()
        except BaseException:
            try:
                self.stream.end_capture()  # an invalidated capture must still be ended
            except Exception:  # it says the capture was invalidated: the error above says why
                pass
            raise
        return self.stream.end_capture()

    def capturable_ops(self):
        """The backend's ops with products that may be captured (made once: a cuBLAS handle)."""
        if self.ops is None:
            self.ops = type(self.backend)(self.cupy, gemm=CublasGemm(self.stream))
        return self.ops

    def _graph(self, sizes):
        """The chunk's graph, captured at first use; None once capture has failed."""
        if self.failure is None and sizes not in self.graphs:
            try:
                self._capture(sizes)
            except Exception as exc:  # any failure to capture: the steps still run, uncaptured
                self._fail(exc)
        return self.graphs.get(sizes)

    def _fail(self, exc):
        """Say once why capture failed; from then on the steps run uncaptured."""
        self.failure = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"CuPy: capturing the training step as a CUDA graph failed ({self.failure}); running it op by op instead",
            RuntimeWarning,
            stacklevel=5,
        )
        self.cupy.cuda.Device().synchronize()

    # -- the trainer's interface ------------------------------------------------------------------
    def run(self, order, first, n, lrs, losses, threads=None):
        """threads, a host loop's count, has no say on the GPU."""
        B = self.batch_size
        sizes = tuple(min(B, self.n_rows - k * B) for k in range(first, first + n))
        self._make_room(sizes)
        graph = self._graph(sizes)
        start = first * B
        self.rows[: sum(sizes)] = order[start : start + sum(sizes)]
        values = numpy.asarray(lrs, self.model.dtype)
        if not numpy.array_equal(self._lrs_held[:n], values):
            self.lrs[:n].set(values)
            self._lrs_held[:n] = values
        if graph is not None:
            graph.launch()
            self.last = self.arrays[sizes[-1]]
        else:
            self._chunk(self.backend, sizes)
        losses[first : first + n] = self.losses[:n]

    def prepare(self, losses):
        """Make the cuBLAS handle ahead of any timing. The graphs themselves are captured at the
        first run of each chunk shape (an epoch has two), a few milliseconds in the first epoch."""
        try:
            self.capturable_ops()
        except Exception as exc:  # the steps will run uncaptured
            self._fail(exc)

    @property
    def buffers(self):
        return self.last
