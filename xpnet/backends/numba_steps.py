"""The Numba backend's compiled training loop: many steps per call, no Python between them.

The reference path runs a step as about fifteen backend calls from the layers, each a trip
through Python and its argument checks; at batch 1 that is most of a step. Here the whole
loop (gather, forward, loss, backward, update, the step's loss stored) is one @njit function
built from the backend's own kernels (_take_normalized_rows, _add_bias_relu,
_softmax_cross_entropy, _mask_and_sum_rows, _sgd_update) and from the model's structure: any
depth, both dtypes, every optimiser option. The math is not written a second time.

The batch is gathered from the training images as loaded, uint8 pixels normalised on the way with
MLP.normalize's operations (so its bits), each row's cache lines asked for eight rows ahead: a
random 784-byte row instead of a 3,136-byte float32 one, and its memory latency overlapped with
the rows before it. An epoch's gather alone (both threads, batch 2048) took 2.2-2.9 ms against
6.0-6.3 ms from the normalised floats; in the loop, 4-6% more samples/s at 2048, 2-4% at 128 and
512, measured interleaved in one process (bench/README.md, "The gather from the 8-bit pixels").

The products call the BLAS NumPy itself uses (its bundled ILP64 OpenBLAS) through ctypes:
numba's own np.dot (through SciPy's OpenBLAS) was 5-15% slower at batch 128 and 512. Owning
the calls buys two things the layer-by-layer path cannot do, each measured on the 2-core
machine (bench/README.md):

- The update is the gradient's product. Without momentum, W <- (1 - lr * decay) * W - lr * g.T @ x
  is one gemm with alpha = -lr and beta = 1 - lr * decay, so no gradient array is written
  and read back and no update pass runs; gemm with beta 1 also skips its zeroing pass. With
  momentum the gradient is formed and _sgd_update applies it, as on the reference path.
- Below FEATURE_MAJOR_BELOW rows, layer outputs are kept feature-major (the transpose of a C
  array): OpenBLAS computes out.T = W @ x.T 2.6x faster than out = x @ W.T at batch 16 and
  1.3x at 64, while from 128 rows the strided elementwise passes over such outputs cost more
  than the product saves.

And from SPLIT_FROM rows, a step is cut in two parts (SPLIT_PARTS) run on two threads of the
loop's own, each with one BLAS thread: each thread gathers its half of the batch's rows and runs
the forward pass, the loss and the backward pass on them (its half's bias-gradient sums and share
of the loss apart), then, once both are there (a spin barrier on an atomic counter), updates its
half of every layer's rows of W and b from the whole batch's gradient, and waits again before
the next step. With one thread per product, OpenBLAS's two threads would leave the gather and
the elementwise passes on one core while its second thread spins on the other; split, they run
on both. Measured on the 2-core machine against the same loop unsplit with OpenBLAS's two
threads (bench/README.md): 1.06x at batch 128, 1.10x at 512, 1.09x at 2048 in a bare loop, at
92-93% of the time of the step's matrix products alone. Below SPLIT_FROM rows the
barriers cost more than the split buys (24-29% slower at batch 1 and 16). The parts are fixed
by the batch size, whoever runs them: at a thread count of one they run one after the other,
and give the same bits as two. The second thread is kept across calls (starting one per chunk
of steps cost 5-6% of an epoch), and its call runs on into the next chunk's steps, posted to it
through an atomic word while it waits (handing each chunk over through Python cost another 2-6%).
The caller's own compiled call makes the post, so no Ctrl-C can fall between the two threads'
shares of a step.
BLAS is held at one thread around the loop: a product on two threads anywhere in the process
leaves OpenBLAS's second thread spinning on a core for about 0.1 s after it, against the loop's
threads; the trainer's validation pass beside split steps runs on the same two threads for that
reason (count_correct).

So a compiled step rounds differently from the reference step (the update in one rounding
instead of two, products in another blocking): `xpnet verify` checks each op of a compiled
step against float64 arithmetic within the same one-op bounds as the reference path, and the
loop is deterministic, so a run resumes bit for bit. On the fold path the layers' W.grad
arrays are not written. Where NumPy's BLAS cannot be found there is no compiled path, and the
trainer runs the reference loop.

The loop is cached on disk like the kernels (about 0.02 s to load against 1.5 s to compile on
the 2-core machine, every run after the first): the BLAS routines are its arguments, so the
cached code calls this process's, and a digest of numba_backend.py and numba_sync.py is in its
cache key (_loop_over), since it inlines those files' kernels. The threads' atomics, barrier and
hand-over of steps are in numba_sync.py.

What the loop trusts, since nothing inside it checks: CompiledSteps makes every buffer from
the model's own sizes, checks the labels once against the classes, and is handed the
trainer's order, a permutation of the rows.
"""

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib
import pathlib
import queue
import threading
import weakref

import numpy

from xpnet.backends import numba_backend, numba_sync
from xpnet.backends.numba_backend import (
    _add_bias_relu,
    _count_correct,
    _mask_and_sum_rows,
    _sgd_update,
    _softmax_cross_entropy,
    _take_normalized_rows,
    kernel,
)
from xpnet.backends.numba_sync import LEFT, barrier, move_end, posted_after, sched_yield
from xpnet.errors import ArgumentError
from xpnet.threads import usable_cores

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
FEATURE_MAJOR_BELOW = 128
# From this many rows a step's work is cut in SPLIT_PARTS parts, run on as many threads of the
# loop's own where the trainer's thread count is that (run): measured on the 2-core machine.
SPLIT_FROM, SPLIT_PARTS = 128, 2


def _numpy_routines(patterns, verbs):
    """The first group of routines named pattern.format(verb), for a pattern, found in NumPy's
    own extension module (dlsym searches the BLAS it bundles too); or None."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            library = ctypes.CDLL(importlib.import_module(module).__file__)
        except (ImportError, OSError):
            continue
        for pattern in patterns:
            names = [pattern.format(verb) for verb in verbs]
            if all(hasattr(library, name) for name in names):
                return tuple(getattr(library, name) for name in names)
    return None


def numpy_blas():
    """NumPy's own sgemm, dgemm, sgemv, dgemv (ILP64 CBLAS), typed for ctypes; or None."""
    routines = _numpy_routines(("scipy_cblas_{}64_", "cblas_{}64_"), ("sgemm", "dgemm", "sgemv", "dgemv"))
    return None if routines is None else _typed(routines)


def numpy_blas_threads():
    """(get, set) of the thread count of NumPy's own OpenBLAS, typed for ctypes; or None."""
    routines = _numpy_routines(("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_"), ("get", "set"))
    if routines is None:
        return None
    get, set_ = routines
    get.argtypes, get.restype = [], ctypes.c_int
    set_.argtypes, set_.restype = [ctypes.c_int], None
    return get, set_


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


@kernel
def _forward(blas, x, weights, biases, relu, outputs, r0, r1):
    """Rows r0:r1 of every layer's output (outputs[l]) from x, those rows of the first layer's
    input: each layer's product, bias and ReLU."""
    for layer in range(len(weights)):
        out = outputs[layer][r0:r1]
        _product(blas, x, False, weights[layer], True, out, 1.0, 0.0)  # out = x @ W.T
        _add_bias_relu(out, biases[layer], relu[layer])
        x = out


def _loop_over(kernels_digest):
    """The compiled loop and its count of correct rows (_train_steps, _count_correct_rows), as
    closures over a digest of numba_backend.py and numba_sync.py (_sources_digest). Numba keys a
    function's disk cache by its own file and the values of its closure, not by the files of what
    it calls: an edit of the kernels the loop inlines changes the digest, so the loop compiles
    afresh rather than loading a copy built from the old kernels."""

    @kernel
    def _train_steps(blas, yield_cpu, sync, part, threads, parts, x_all, y_all, mean, std, order, first, n, span,
                     batch_size, weights, biases, relu, grad_weights, grad_biases, velocity_weights, velocity_biases,
                     momentum, nesterov, weight_decay, lrs, inputs, outputs, grads_z, grads_x, grad_logits, labels,
                     bias_parts, loss_parts, losses):  # fmt: skip
        """Steps first .. first + n - 1 of the epoch whose row order is `order`, as thread
        `part` of `threads`, each step's work cut in `parts` (thread t takes parts t, t +
        threads, ...); lrs[k] is step k's learning rate. For each of its parts of the batch's
        rows: the gather into `inputs` of (x_all's row - mean) / std (CompiledSteps._source),
        every layer forward (layer l's output in outputs[l]), the part's share of the loss
        (loss_parts[p]) and every layer's backward pass (its bias-gradient column sums in
        bias_parts[l][p]). Then, once every thread is there, for each of its parts of every
        layer's rows of W and b: the update from the whole batch's gradient; part 0 stores the
        loss (losses[k]). On two threads, part 0 first posts its steps to the second thread
        (move_end; False, and no step taken, if that thread has left), which takes the steps
        posted to it until none come; `span` is the first step of the second thread's call: the
        barriers count from there. Returns True once the steps are taken."""
        _ = kernels_digest  # a closure cell, so in Numba's cache key (_loop_over)
        layers = len(weights)
        k, end = first, first + n
        if part == 0 and threads > 1 and not move_end(sync, first, end):
            return False  # the second thread had gone back to Python: nothing posted, nothing run
        while True:
            if k == end:
                if part == 0 or threads == 1:
                    return True
                end = posted_after(sync, end, yield_cpu)
                if end == LEFT:
                    return True
            start = k * batch_size
            rows = min(batch_size, order.shape[0] - start)
            for p in range(part, parts, threads):
                r0, r1 = p * rows // parts, (p + 1) * rows // parts
                indices = order[start + r0 : start + r1]
                x = inputs[r0:r1]
                _take_normalized_rows(x_all, indices, mean, std, x)
                y = labels[r0:r1]
                for i in range(r1 - r0):
                    y[i] = y_all[indices[i]]
                _forward(blas, x, weights, biases, relu, outputs, r0, r1)
                grad = grad_logits[r0:r1]
                loss_parts[p] = _softmax_cross_entropy(outputs[layers - 1][r0:r1], y, grad, rows)
                for layer in range(layers - 1, 0, -1):  # grad x of every layer but the first
                    grad_z = grads_z[layer][r0:r1]
                    _mask_and_sum_rows(grad, outputs[layer][r0:r1], relu[layer], grad_z, bias_parts[layer][p])
                    grad_z = grad_z if relu[layer] else grad
                    grad = grads_x[layer][r0:r1]
                    _product(blas, grad_z, False, weights[layer], False, grad, 1.0, 0.0)  # with this step's W
                _mask_and_sum_rows(grad, outputs[0][r0:r1], relu[0], grads_z[0][r0:r1], bias_parts[0][p])
            if threads > 1:  # every row's gradients are in before any W changes
                barrier(sync, threads, 2 * (k - span) + 1, yield_cpu)
            lr = lrs[k]
            for p in range(part, parts, threads):
                if p == 0:
                    loss = loss_parts[0]
                    for q in range(1, parts):
                        loss += loss_parts[q]
                    losses[k] = loss
                for layer in range(layers):
                    n_out = weights[layer].shape[0]
                    w0, w1 = p * n_out // parts, (p + 1) * n_out // parts
                    x = inputs[:rows] if layer == 0 else outputs[layer - 1][:rows]
                    if relu[layer]:
                        grad_z = grads_z[layer][:rows, w0:w1]
                    else:  # the gradient that reached the layer: the loss's, or the next layer's grad x
                        grad_z = (grad_logits if layer == layers - 1 else grads_x[layer + 1])[:rows, w0:w1]
                    grad_b = grad_biases[layer]
                    for j in range(w0, w1):  # the parts' column sums, in part order
                        grad_b[j] = bias_parts[layer][0, j]
                        for q in range(1, parts):
                            grad_b[j] += bias_parts[layer][q, j]
                    if momentum == 0:  # W <- (1 - lr * decay) * W - lr * g.T @ x: the update is the product's
                        _product(blas, grad_z, True, x, False, weights[layer][w0:w1], -lr, 1.0 - lr * weight_decay)
                    else:
                        _product(blas, grad_z, True, x, False, grad_weights[layer][w0:w1], 1.0, 0.0)  # g.T @ x
                        for r in range(w0, w1):
                            _sgd_update(weights[layer][r], grad_weights[layer][r], lr, velocity_weights[layer][r],
                                        momentum, nesterov, weight_decay)  # fmt: skip
                    _sgd_update(biases[layer][w0:w1], grad_b[w0:w1], lr, velocity_biases[layer][w0:w1], momentum,
                                nesterov, weight_decay)  # fmt: skip
            if threads > 1:  # every W is updated before the next step's forward reads it
                barrier(sync, threads, 2 * (k - span) + 2, yield_cpu)
            k += 1

    @kernel
    def _count_correct_rows(blas, part, parts, x, y, weights, biases, relu, outputs):
        """How many rows of x the model predicts as y, counting thread part's share of parts of
        the rows, in blocks of len(outputs[0]) rows."""
        _ = kernels_digest
        block, correct = outputs[0].shape[0], 0
        first, last = part * x.shape[0] // parts, (part + 1) * x.shape[0] // parts
        for start in range(first, last, block):
            rows = min(block, last - start)
            _forward(blas, x[start : start + rows], weights, biases, relu, outputs, 0, rows)
            correct += _count_correct(outputs[-1][:rows], y[start : start + rows])
        return correct

    return _train_steps, _count_correct_rows


BLAS = numpy_blas()
BLAS_THREADS = numpy_blas_threads()
YIELD_CPU = sched_yield()


def _sources_digest(*modules):
    """A SHA-256 of the modules' source files, one after the other."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(pathlib.Path(module.__file__).read_bytes())
    return digest.hexdigest()


_train_steps, _count_correct_rows = _loop_over(_sources_digest(numba_backend, numba_sync))


def _serve(jobs, done):
    """The loop's second thread: runs each (number, function, arguments) put in jobs, and puts
    (number, its result, None) or (number, None, the exception raised) in done, until None comes."""
    while (job := jobs.get()) is not None:
        number, function, args = job
        try:
            done.put((number, function(*args), None))
        except BaseException as exc:  # handed to the caller, which raises it
            done.put((number, None, exc))


@contextlib.contextmanager
def _one_blas_thread():
    """NumPy's OpenBLAS on one thread inside the block, as the loop's own threads need it."""
    get_threads, set_threads = BLAS_THREADS
    previous = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)


@dataclasses.dataclass
class _Span:
    """The second thread's call that runs steps: its number, the order and its first step (where
    the barriers count from)."""

    job: int
    order: numpy.ndarray
    first: int


class CompiledSteps:
    """A trainer's steps as one compiled call: run(order, first, n, lrs, losses, threads) takes
    steps first .. first + n - 1 of the epoch with that row order, updating the model's
    parameters and the optimiser's velocities in place, with lrs[s] the learning rate of step s.
    It holds the model's own arrays: whoever changes a parameter writes into it (value[...] =
    ...), as checkpoints and verify do, and never swaps the array for another. feature_major
    None keeps layer outputs feature-major below FEATURE_MAJOR_BELOW rows; True or False forces
    a layout. From SPLIT_FROM rows a step's work is cut in two parts (split; see run)."""

    # Any number of steps a call, the same bits however an epoch is cut: the trainer may lengthen
    # its chunks to spend less time in Python between them.
    chunks_may_grow = True

    def __init__(self, backend, model, optimizer, train_x, train_y, batch_size, feature_major=None, train_images=None):
        layers = model.net.layers
        dtype = model.dtype
        backend._check_range("labels", train_y, model.sizes[-1])
        self.source = self._source(model, train_x, train_y, train_images)
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
        self.parts = SPLIT_PARTS if batch >= SPLIT_FROM and BLAS_THREADS is not None else 1
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
        # Each part's column sums of each layer's output gradient and its share of the loss.
        self.bias_parts = tuple(numpy.empty((self.parts, size), dtype) for size in model.sizes[1:])
        self.loss_parts = numpy.empty(self.parts)
        self.rates = numpy.zeros(-(-len(train_y) // batch_size))  # each step's learning rate
        # The barriers' count of arrivals, and the end of the steps posted to the second thread
        # (a new pair for each call of the second thread that runs steps: run).
        self.sync = numpy.zeros(2, numpy.int64)
        self._queues, self._job = None, 0  # the second thread's, and the number of the last call
        self._span = None  # a _Span while the second thread's call runs steps (run)
        self._eval_outputs = None  # count_correct's, made at its first call

    @staticmethod
    def _source(model, train_x, train_y, train_images):
        """What the loop gathers a batch from, (rows, labels, mean, std), each row normalised on the
        way as (row - mean) / std in the model's dtype: uint8 images as loaded, with the model's
        mean and std (MLP.normalize's operations, so its bits), are a quarter of the bytes of
        train_x to fetch from memory; other images, train_x as it is (mean 0, std 1)."""
        scalar = model.dtype.type
        if train_images is None or train_images.dtype != numpy.uint8:
            return train_x, train_y, scalar(0), scalar(1)
        pixels = numpy.ascontiguousarray(train_images).reshape(len(train_images), -1)
        if pixels.shape != train_x.shape:
            raise ArgumentError(f"train_images hold {pixels.shape} pixels where train_x has {train_x.shape} rows")
        return pixels, train_y, scalar(model.mean), scalar(model.std)

    def split_threads(self, threads):
        """Whether run(..., threads) runs the parts on threads of its own, one per part: when the
        step is split and the count (None: the usable cores) is two."""
        return self.parts == SPLIT_PARTS and (threads or usable_cores()) == SPLIT_PARTS

    def blas_threads(self, threads):
        """The BLAS thread count for the trainer's count: one where the loop runs threads of its
        own (a product elsewhere on two would leave OpenBLAS's second thread spinning on a core
        for about 0.1 s after it, against them), else the count itself."""
        return 1 if self.split_threads(threads) else threads

    def run(self, order, first, n, lrs, losses, threads=None):
        """The steps with `threads` the trainer's thread count. Split steps run on two threads
        when it is two (this one and a second kept for it, _helper) and on this one after the
        other when it is one, BLAS on one thread either way, so the bits are the same at both
        counts; at more, after each other on BLAS's threads. Unsplit, on this thread with BLAS's.

        On two threads the second one's call goes on past these steps, waiting a few milliseconds
        for more (posted_after), and this thread's call for the next steps with the same order,
        from where these ended, posts them to it (move_end) instead of handing it a new call
        through Python, which cost 2-6% of an epoch on the 2-core machine (the trainer then made
        twenty calls an epoch). A new call of the second thread starts with no steps and
        waits for this thread's post too. Posting from inside the compiled call leaves no Python,
        and so no Ctrl-C, between handing the second thread steps and this thread's share of
        them, without which the second would wait at their first barrier for ever: a Ctrl-C
        anywhere in here at worst leaves the second thread waiting a few milliseconds for steps
        that never come, and it goes back to Python by itself."""
        count = threads or usable_cores()
        two = self.split_threads(count) and n > 0
        self.rates[first : first + n] = lrs

        def part(p, span, steps):
            buffers = (self.inputs, self.outputs, self.grads_z, self.grads_x, self.grad_logits, self.labels)
            return (BLAS, YIELD_CPU, self.sync, p, 1 + two, self.parts, *self.source, order, first, steps, span,
                    self.batch_size, *self.model_arrays, self.rates, *buffers, self.bias_parts, self.loss_parts,
                    losses)  # fmt: skip

        if self.parts == 1 or count > SPLIT_PARTS:
            self._release()
            _train_steps(*part(0, first, n))
            return
        with _one_blas_thread():
            while True:
                span = self._span
                if not (two and span is not None and span.order is order and self.sync[1] == first):
                    self._release()
                    if two:  # a pair of its own: a call cut off from its _Span by Ctrl-C takes no other's steps
                        self.sync = numpy.array([0, first], numpy.int64)
                        span = self._span = _Span(self._submit(_train_steps, part(1, first, 0)), order, first)
                if _train_steps(*part(0, span.first if two else first, n)):
                    return
                # Not posted: the second thread, kept waiting past WAIT_ROUNDS (this thread held
                # up elsewhere), had gone back to Python. The next round starts it afresh.

    def _release(self):
        """Make the second thread leave the call it runs steps in, if any, and wait until it has."""
        if self._span is not None:
            job, self._span = self._span.job, None
            move_end(self.sync, self.sync[1], LEFT)  # False only where it has just left by itself
            self._reply(job)

    def count_correct(self, x, y, threads=None):
        """How many rows of x (device data, normalised) the model predicts as y, where run would
        take its steps on two threads of its own (else None: the trainer's reference pass does
        it): each thread half of the rows, with one BLAS thread, as BLAS stays beside the loop."""
        takes = x.ndim == 2 and x.shape[1] == self.inputs.shape[1] and x.dtype == self.inputs.dtype
        takes = takes and x.flags.c_contiguous and y.shape == x.shape[:1] and y.dtype.kind in "iu"
        if not (takes and self.split_threads(threads)):  # the reference pass checks what it was given
            return None
        if self._eval_outputs is None:  # each thread's layer outputs for a block of rows
            dtype, sizes = self.inputs.dtype, [W.shape[0] for W in self.model_arrays[0]]
            block = numba_backend.NumbaBackend.eval_rows
            outputs = lambda: tuple(numpy.empty((block, size), dtype) for size in sizes)  # noqa: E731
            self._eval_outputs = [outputs() for _ in range(SPLIT_PARTS)]
        weights, biases, relu = self.model_arrays[:3]
        part = lambda p: (BLAS, p, SPLIT_PARTS, x, y, weights, biases, relu, self._eval_outputs[p])  # noqa: E731
        self._release()
        with _one_blas_thread():
            return sum(self._on_two_threads(_count_correct_rows, part))

    def _on_two_threads(self, function, part):
        """[function(*part(0)), function(*part(1))], the first on this thread, the second on the
        loop's second thread (_helper)."""
        job = self._submit(function, part(1))
        return [function(*part(0)), self._reply(job)]

    def _submit(self, function, args):
        """Hand function(*args) to the loop's second thread (_helper); returns the call's number."""
        self._job += 1
        self._helper()[0].put((self._job, function, args))
        return self._job

    def _reply(self, job):
        """What the second thread's call `job` returned (raised, if it raised)."""
        while (reply := self._helper()[1].get())[0] != job:  # a reply to a call that Ctrl-C left
            pass
        if reply[2] is not None:
            raise reply[2]
        return reply[1]

    def _helper(self):
        """(jobs, done): the queues of the loop's second thread, started at the first split call.
        Kept across calls: starting a thread for each call (a twentieth of an epoch) cost 5-6%
        of an epoch on the 2-core machine. It ends when this object goes."""
        if self._queues is None:
            self._queues = queue.SimpleQueue(), queue.SimpleQueue()
            threading.Thread(target=_serve, args=self._queues, name="xpnet-steps", daemon=True).start()
            weakref.finalize(self, self._queues[0].put, None)
        return self._queues

    def prepare(self, losses):
        """Compile the loop, and where steps are split the count and the post of steps, or load
        them from the disk cache (calls of no steps and no rows), never inside a timed epoch."""
        self.run(numpy.zeros(0, numpy.int64), 0, 0, numpy.zeros(0), losses, threads=1)
        if self.parts == SPLIT_PARTS:  # its outputs' types are count_correct's: C arrays
            _count_correct_rows(BLAS, 0, 1, self.inputs[:0], self.labels[:0], *self.model_arrays[:3], self.outputs)
            move_end(numpy.zeros(2, numpy.int64), 1, 1)  # sync[1] holds 0, not 1: nothing moves
