"""The CuPy backend's compiled path: a trainer's steps captured as CUDA graphs and replayed.

Op by op, a step is some twenty kernel launches, each a trip through Python and CuPy's
dispatch, and at MNIST's sizes a kernel can finish sooner than Python launches the next
(bench/gpu_ops.py measures both sides). A CUDA graph records the launches of a chunk of steps
once and replays them in one call, so the GPU runs the chunk back to back. The step is the
reference step, made of the backend's own ops; only the products go another way (below).

What a replay needs, and how it is met:
- Every array keeps its address between capture and replay. The batch, each layer's output
  and gradients, and the chunk's rows, learning rates and losses live in buffers of this
  object, made before capture. The temporaries the ops make come from a memory pool of its
  own that nobody else allocates from, so no later allocation lands where a graph writes.
- What changes between replays is read from those buffers: before a replay the chunk's rows
  are copied from the epoch's order, and its learning rates uploaded when they change (once,
  under a constant schedule).
- CuPy refuses cuBLAS calls while a stream is being captured (cupy_backends/cuda/libs/
  cublas.pyx, setStream), so the captured products call cuBLAS's gemm through ctypes, on a
  handle of this object bound to the capture stream (CublasGemm).
- Capture runs on a side stream (the legacy default stream cannot be captured), after one
  uncaptured step of each batch size on it, which compiles kernels and fills the pool and
  whose update is then undone; replays and the copies around them run on the current stream,
  ordered with the rest of the trainer's work.

Nothing inside a graph checks: the labels are checked once here against the classes, and the
order is the trainer's permutation of the rows, as numba_steps.CompiledSteps trusts it too.
Where capture fails, a warning says why and the same steps run uncaptured.
"""

import ctypes
import warnings

import numpy

from xpnet.backends.cupy_backend import CupyBackend

OP_N, OP_T = 0, 1  # cublasOperation_t
WORKSPACE_BYTES = 32 * 2**20  # cuBLAS's advice for Hopper; set before capture so none is allocated in it
MAX_GRAPHS = 8  # distinct chunk shapes kept; an epoch uses two (whole chunks, and the last)


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


class CapturableOps(CupyBackend):
    """The CuPy backend's ops with the products through CublasGemm: callable during capture."""

    def __init__(self, xp, gemm):
        super().__init__(xp)
        self._gemm = gemm

    def _matmul(self, a, b, out):
        return self._gemm(a, b, out)


class StepArrays:
    """The arrays of one step at one batch size: the batch, each layer's output (outputs[i] of
    layer i), masked output gradient (grads_z[i]) and input gradient (grads_x[i], i > 0), the
    loss gradient. The names are numba_steps.CompiledSteps', which `xpnet verify` reads."""

    def __init__(self, backend, sizes, rows, dtype):
        empty = backend.empty
        self.inputs = empty((rows, sizes[0]), dtype)
        self.labels = empty((rows,), numpy.int64)
        self.outputs = [empty((rows, size), dtype) for size in sizes[1:]]
        self.grads_z = [empty((rows, size), dtype) for size in sizes[1:]]
        self.grads_x = [None] + [empty((rows, size), dtype) for size in sizes[1:-1]]
        self.grad_logits = empty((rows, sizes[-1]), dtype)


class GraphSteps:
    """A trainer's steps as replays of CUDA graphs: run(order, first, n, lrs, losses) takes steps
    first .. first + n - 1 of the epoch with that row order, as numba_steps.CompiledSteps does,
    and holds the model's arrays likewise: whoever changes a parameter writes into it."""

    chunks_may_grow = False  # each chunk length is a CUDA graph of its own to capture

    def __init__(self, backend, model, optimizer, train_x, train_y, batch_size):
        cupy = backend.xp
        self.cupy, self.backend, self.model, self.optimizer = cupy, backend, model, optimizer
        backend._check_range("labels", train_y, model.sizes[-1])  # raised by the next read from the device
        self.data = (train_x, train_y)
        self.batch_size, self.n_rows = batch_size, len(train_y)
        self.arrays = {}  # StepArrays by batch size
        self.last = None  # the StepArrays of the last step run
        self.graphs = {}  # by the batch sizes of a chunk's steps
        self.rows = self.lrs = self.losses = None  # the chunk's, sized by _make_room
        self._lrs_held = None  # the host values self.lrs holds, NaN where unknown
        self.failure = None  # why capture failed, once it has
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.ops = None  # CapturableOps, made at the first capture

    # -- the step: the reference step's ops on this object's buffers -------------------------
    def _step(self, ops, arrays, rows, lr, loss_out):
        train_x, train_y = self.data
        x, y = ops._take_rows(train_x, rows, arrays.inputs), ops._take_rows(train_y, rows, arrays.labels)
        layers, inputs = self.model.net.layers, [x, *arrays.outputs]
        for i, layer in enumerate(layers):
            ops._linear_forward(inputs[i], layer.W.value, layer.b.value, layer.relu, inputs[i + 1])
        loss = ops._softmax_cross_entropy(inputs[-1], y, arrays.grad_logits)
        grad = arrays.grad_logits
        for i in reversed(range(len(layers))):
            layer = layers[i]
            relu_output = inputs[i + 1] if layer.relu else None
            ops._linear_backward(
                inputs[i], layer.W.value, grad, layer.W.grad, layer.b.grad, arrays.grads_x[i], relu_output,
                arrays.grads_z[i],
            )  # fmt: skip
            grad = arrays.grads_x[i]
        opt = self.optimizer
        for p, velocity in zip(opt.parameters, opt.velocities):
            ops._sgd_update(p.value, p.grad, lr, velocity, opt.momentum, opt.nesterov, opt.weight_decay)
        loss_out[...] = loss
        self.last = arrays

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
            self.arrays[size] = StepArrays(self.backend, self.model.sizes, size, self.model.dtype)
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
        state = [p.value for p in self.optimizer.parameters] + [v for v in self.optimizer.velocities if v is not None]
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
            self.ops = CapturableOps(self.cupy, CublasGemm(self.stream))
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
        """As numba_steps.CompiledSteps.run; threads, a host loop's, has no say on the GPU."""
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

    def count_correct(self, x, y, threads=None):
        """None: the trainer's reference pass counts, as numba_steps.CompiledSteps.count_correct
        leaves it to where the loop has no threads of its own."""
        return None

    def prepare(self, losses):
        """Make the cuBLAS handle ahead of any timing. The graphs themselves are captured at the
        first run of each chunk shape (an epoch has two), a few milliseconds in the first epoch."""
        try:
            self.capturable_ops()
        except Exception as exc:  # the steps will run uncaptured
            self._fail(exc)

    # The last step's arrays, as numba_steps.CompiledSteps names them (xpnet verify reads them).
    inputs = property(lambda self: self.last.inputs)
    outputs = property(lambda self: self.last.outputs)
    grads_z = property(lambda self: self.last.grads_z)
    grads_x = property(lambda self: self.last.grads_x)
    grad_logits = property(lambda self: self.last.grad_logits)
