"""The Numba backend's compiled training loop: many steps per call, no Python between them.

The whole step (gather, forward, loss, backward, update) is one @njit function built from the
backend's own kernels (numba_kernels.py) and the optimiser's lowered rule (numba_rules.py), for
any depth and both dtypes; compile_steps declines what those files do not lower. It gathers the
batch from the uint8 images, calls NumPy's BLAS through ctypes (blas.py), keeps small batches
feature-major, and from SPLIT_FROM rows splits each step between two threads of its own with
the same bits on one thread or two. It trusts what nothing inside it checks: CompiledLoop makes
every buffer from the model's own sizes, checks the labels once, and is handed the trainer's
order, a permutation of the rows. Why each mechanism is there: docs/design.md, "Numba's compiled
loop"; what each measured: bench/history.md.
"""

import hashlib
import pathlib
import queue
import threading
import weakref
from typing import NamedTuple

import numpy
from numba import njit

from xpnet.backends import numba_kernels, numba_rules, numba_sync, steps
from xpnet.backends.base import activation_code
from xpnet.backends.blas import BLAS, BLAS_THREADS, FEATURE_MAJOR_BELOW, one_blas_thread
from xpnet.backends.numba_kernels import (
    IDENTITY,
    activation_grad_and_sum_rows,
    add_bias_activate,
    count_correct,
    kernel,
    product,
    softmax_cross_entropy,
    take_normalized_rows,
)
from xpnet.backends.numba_rules import update_rows
from xpnet.backends.numba_sync import GAVE_UP, STATE, barrier, sched_yield
from xpnet.errors import ArgumentError
from xpnet.threads import usable_cores

# From this many rows a step's work is cut in SPLIT_PARTS parts, run on as many threads of the
# loop's own where the trainer's thread count is that (run): measured on a 2-core machine.
SPLIT_FROM, SPLIT_PARTS = 128, 2
YIELD_CPU = sched_yield()


class Source(NamedTuple):
    """What the loop gathers a batch from: rows, normalised on the way as (row - mean) / std in
    the model's dtype, and their labels."""

    rows: numpy.ndarray
    labels: numpy.ndarray
    mean: numpy.floating
    std: numpy.floating


class ModelArrays(NamedTuple):
    """The model's own arrays, layer by layer, and each layer's activation code."""

    weights: tuple
    biases: tuple
    grad_weights: tuple
    grad_biases: tuple
    activations: tuple


class LoopBuffers(NamedTuple):
    """A step's arrays (steps.StepBuffers' five), and each part's bias-gradient column sums
    (bias_parts[layer][part]) and share of the loss (loss_parts[part])."""

    inputs: numpy.ndarray
    labels: numpy.ndarray
    outputs: tuple
    grads_y: tuple
    grads_z: tuple
    bias_parts: tuple
    loss_parts: numpy.ndarray


class Split(NamedTuple):
    """This thread's share of a step cut in `parts`: parts part, part + threads, ...; sync is
    the threads' barrier (numba_sync)."""

    part: int
    threads: int
    parts: int
    sync: numpy.ndarray
    yield_cpu: object


def lowering_problem(model, optimizer):
    """None where the compiled loop runs this model and optimiser; else why not."""
    if BLAS is None:
        return "NumPy's own BLAS routines were not found"
    return steps.lowering_problem(model, optimizer, tuple(numba_rules.LOWERED), steps.OUTPUT_ACTIVATIONS)


# These two inline numba_kernels' kernels and are not cached on their own: a copy cached against
# this file would keep the kernels as they were when it was built. They are compiled into the
# loop, whose cache the digest of those files keys (_loop_over).
@njit(nogil=True)
def _forward(blas, x, model, outputs, r0, r1):
    """Rows r0:r1 of every layer's output (outputs[l]) from x, those rows of the first layer's
    input: each layer's product, bias and activation."""
    for layer in range(len(model.weights)):
        out = outputs[layer][r0:r1]
        product(blas, x, False, model.weights[layer], True, out, 1.0, 0.0)  # out = x @ W.T
        add_bias_activate(out, model.biases[layer], model.activations[layer])
        x = out


@njit(nogil=True)
def _gather_forward_backward(blas, source, model, buffers, indices, r0, r1, rows, part):
    """Rows r0:r1 of a batch of `rows`: gathered from the source's rows at `indices`, forward,
    the loss (this part's share in loss_parts), and every layer's backward pass but the update:
    grad_z, the part's bias-gradient sums, and grad x of every layer but the first."""
    x = buffers.inputs[r0:r1]
    take_normalized_rows(source.rows, indices, source.mean, source.std, x)
    labels = buffers.labels[r0:r1]
    for i in range(r1 - r0):
        labels[i] = source.labels[indices[i]]
    _forward(blas, x, model, buffers.outputs, r0, r1)
    last = len(model.weights) - 1
    logits, grad_logits = buffers.outputs[last][r0:r1], buffers.grads_y[last][r0:r1]
    buffers.loss_parts[part] = softmax_cross_entropy(logits, labels, grad_logits, rows)
    for layer in range(last, -1, -1):
        grad_y, grad_z = buffers.grads_y[layer][r0:r1], buffers.grads_z[layer][r0:r1]
        output, activation = buffers.outputs[layer][r0:r1], model.activations[layer]
        activation_grad_and_sum_rows(grad_y, output, activation, grad_z, buffers.bias_parts[layer][part])
        if layer > 0:  # grad x = g @ W, with this step's W
            g = grad_y if activation == IDENTITY else grad_z
            product(blas, g, False, model.weights[layer], False, buffers.grads_y[layer - 1][r0:r1], 1.0, 0.0)


def _loop_over(kernels_digest):
    """The compiled loop and its count of correct rows (train_steps, count_correct_rows), as
    closures over a digest of the files whose kernels they inline (_sources_digest). Numba keys a
    function's disk cache by its own file and the values of its closure, not by the files of what
    it calls: an edit of those kernels changes the digest, so the loop compiles afresh rather than
    loading a copy built from the old ones."""

    @kernel
    def train_steps(blas, split, source, model, rule, buffers, order, first, n, batch_size, lrs, losses):
        """Steps first .. first + n - 1 of the epoch whose row order is `order`, lrs[k] the rate
        of step k, its loss stored in losses[k], as this thread's share of each step (split).
        Returns False where the other thread gave the call up (the steps then end early)."""
        _ = kernels_digest  # a closure cell, so in Numba's cache key
        layers = len(model.weights)
        for k in range(first, first + n):
            start = k * batch_size
            rows = min(batch_size, order.shape[0] - start)
            for p in range(split.part, split.parts, split.threads):
                r0, r1 = p * rows // split.parts, (p + 1) * rows // split.parts
                indices = order[start + r0 : start + r1]
                _gather_forward_backward(blas, source, model, buffers, indices, r0, r1, rows, p)
            # Every row's gradients are in before any W changes.
            if split.threads > 1 and not barrier(split.sync, split.threads, 2 * (k - first) + 1, split.yield_cpu):
                return False
            for p in range(split.part, split.parts, split.threads):
                if p == 0:
                    loss = buffers.loss_parts[0]
                    for q in range(1, split.parts):
                        loss += buffers.loss_parts[q]
                    losses[k] = loss
                for layer in range(layers):
                    n_out = model.weights[layer].shape[0]
                    w0, w1 = p * n_out // split.parts, (p + 1) * n_out // split.parts
                    x = buffers.inputs[:rows] if layer == 0 else buffers.outputs[layer - 1][:rows]
                    grad_b = model.grad_biases[layer]
                    for j in range(w0, w1):  # the parts' column sums, in part order
                        grad_b[j] = buffers.bias_parts[layer][0, j]
                        for q in range(1, split.parts):
                            grad_b[j] += buffers.bias_parts[layer][q, j]
                    if model.activations[layer] == IDENTITY:
                        grad_z = buffers.grads_y[layer][:rows, w0:w1]
                    else:
                        grad_z = buffers.grads_z[layer][:rows, w0:w1]
                    W, grad_W, b = model.weights[layer], model.grad_weights[layer], model.biases[layer]
                    update_rows(rule, blas, layer, w0, w1, W, grad_W, b, grad_b, grad_z, x, lrs[k])
            # Every W is updated before the next step's forward pass reads it.
            if split.threads > 1 and not barrier(split.sync, split.threads, 2 * (k - first) + 2, split.yield_cpu):
                return False
        return True

    @kernel
    def count_correct_rows(blas, part, parts, x, y, model, outputs):
        """How many rows of x the model predicts as y, counting this part's share of parts of the
        rows, in blocks of len(outputs[0]) rows."""
        _ = kernels_digest
        block, correct = outputs[0].shape[0], 0
        first, last = part * x.shape[0] // parts, (part + 1) * x.shape[0] // parts
        for start in range(first, last, block):
            rows = min(block, last - start)
            _forward(blas, x[start : start + rows], model, outputs, 0, rows)
            correct += count_correct(outputs[-1][:rows], y[start : start + rows])
        return correct

    return train_steps, count_correct_rows


def _sources_digest(*modules):
    """A SHA-256 of the modules' source files, one after the other."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(pathlib.Path(module.__file__).read_bytes())
    return digest.hexdigest()


train_steps, count_correct_rows = _loop_over(_sources_digest(numba_kernels, numba_rules, numba_sync))


def _serve(jobs, done):
    """The loop's second thread: runs each (number, function, arguments) put in jobs, and puts
    (number, its result, None) or (number, None, the exception raised) in done, until None comes."""
    while (job := jobs.get()) is not None:
        number, function, args = job
        try:
            done.put((number, function(*args), None))
        except BaseException as exc:  # handed to the caller, which raises it
            done.put((number, None, exc))


class CompiledLoop(steps.CompiledSteps):
    """A trainer's steps as calls of the compiled loop (see the module's note). feature_major None
    keeps layer outputs feature-major below FEATURE_MAJOR_BELOW rows; True or False forces a layout."""

    # Any number of steps a call, the same bits however an epoch is cut: the trainer may lengthen
    # its chunks to spend less time in Python between them.
    chunks_may_grow = True

    def __init__(self, model, optimizer, data, batch_size, feature_major=None):
        sizes, dtype = model.sizes, model.dtype
        if len(data.y) and numba_kernels.outside(data.y, sizes[-1]):
            low, high = data.y.min(), data.y.max()
            raise ArgumentError(f"labels must lie in [0, {sizes[-1]}), got values from {low} to {high}")
        self.source = self._source(model, data)
        layers = model.net.layers
        self.model = ModelArrays(
            tuple(layer.W.value for layer in layers),
            tuple(layer.b.value for layer in layers),
            tuple(layer.W.grad for layer in layers),
            tuple(layer.b.grad for layer in layers),
            tuple(activation_code(layer.activation) for layer in layers),
        )
        self.rule = numba_rules.lower(optimizer)
        self.batch_size = batch_size
        batch = min(batch_size, len(data.y))
        feature_major = batch < FEATURE_MAJOR_BELOW if feature_major is None else feature_major
        self.parts = SPLIT_PARTS if batch >= SPLIT_FROM and BLAS_THREADS is not None else 1

        def per_layer(feature_major=False):
            if feature_major:
                return tuple(numpy.empty((size, batch), dtype).T for size in sizes[1:])
            return tuple(numpy.empty((batch, size), dtype) for size in sizes[1:])

        self.loop_buffers = LoopBuffers(
            numpy.empty((batch, sizes[0]), dtype),
            numpy.empty(batch, data.y.dtype),
            per_layer(feature_major),
            per_layer(),
            per_layer(),
            tuple(numpy.empty((self.parts, size), dtype) for size in sizes[1:]),
            numpy.empty(self.parts),
        )
        self.rates = numpy.zeros(-(-len(data.y) // batch_size))  # each step's learning rate
        self._queues, self._job = None, 0  # the second thread's, and the number of the last call
        self._eval_outputs = None  # count_correct's, made at its first call

    @staticmethod
    def _source(model, data):
        """uint8 images as loaded, with the model's mean and std (MLP.normalize's operations, so
        its bits), are a quarter of the bytes of float32 rows to fetch from memory; other images,
        the normalised rows data.x as they are (mean 0, std 1)."""
        scalar = model.dtype.type
        if data.images is None or data.images.dtype != numpy.uint8:
            return Source(data.x, data.y, scalar(0), scalar(1))
        pixels = numpy.ascontiguousarray(data.images).reshape(len(data.images), -1)
        if pixels.shape != data.x.shape:
            raise ArgumentError(f"the images hold {pixels.shape} pixels where the rows are {data.x.shape}")
        return Source(pixels, data.y, scalar(model.mean), scalar(model.std))

    @property
    def buffers(self):
        return steps.StepBuffers(*self.loop_buffers[:5])

    def split_threads(self, threads):
        """Whether run(..., threads) runs the parts on threads of its own, one per part: when the
        step is split and the count (None: the usable cores) is two."""
        return self.parts == SPLIT_PARTS and (threads or usable_cores()) == SPLIT_PARTS

    def blas_threads(self, threads):
        """One where the loop runs threads of its own (a product elsewhere on two would leave
        OpenBLAS's second thread spinning on a core for about 0.1 s after it, against them), else
        the count itself."""
        return 1 if self.split_threads(threads) else threads

    def run(self, order, first, n, lrs, losses, threads=None):
        """Split steps run on two threads where the count is two, and on this one, part after
        part, where it is one, BLAS on one thread either way, so the bits are the same at both
        counts; at more, part after part on BLAS's threads. Unsplit, on this thread with BLAS's."""
        count = threads or usable_cores()
        self.rates[first : first + n] = lrs

        def arguments(part, threads, sync):
            split, arrays = Split(part, threads, self.parts, sync, YIELD_CPU), (self.source, self.model, self.rule)
            return BLAS, split, *arrays, self.loop_buffers, order, first, n, self.batch_size, self.rates, losses

        one_thread = arguments(0, 1, numpy.zeros(2, numpy.int64))
        if self.parts == 1 or count > SPLIT_PARTS:
            train_steps(*one_thread)
            return
        with one_blas_thread():
            if count == 1 or n == 0:
                train_steps(*one_thread)
            else:
                self._on_two_threads(train_steps, lambda part, sync: arguments(part, 2, sync))

    def count_correct(self, x, y, threads=None):
        """Where run would take its steps on two threads of its own: each thread counts half of the
        rows, with one BLAS thread, as BLAS stays beside the loop (on MNIST's 10,000 validation
        rows, 5-8% of an epoch's wall time less than the reference pass). Else None."""
        takes = x.ndim == 2 and x.shape[1] == self.loop_buffers.inputs.shape[1]
        takes = takes and x.dtype == self.loop_buffers.inputs.dtype and x.flags.c_contiguous
        takes = takes and y.shape == x.shape[:1] and y.dtype.kind in "iu"
        if not (takes and self.split_threads(threads)):  # the reference pass checks what it was given
            return None
        if self._eval_outputs is None:  # each thread's layer outputs for a block of 2048 rows
            layer_outputs = lambda: tuple(numpy.empty((2048, W.shape[0]), x.dtype) for W in self.model.weights)
            self._eval_outputs = [layer_outputs() for _ in range(SPLIT_PARTS)]

        def arguments(part, sync):
            return BLAS, part, SPLIT_PARTS, x, y, self.model, self._eval_outputs[part]

        with one_blas_thread():
            return sum(self._on_two_threads(count_correct_rows, arguments))

    def _on_two_threads(self, function, arguments):
        """[function(*arguments(0, sync)), function(*arguments(1, sync))], the second on the loop's
        second thread. Should this thread's own call not complete (Ctrl-C before or in it), it
        marks sync so that the second leaves at its next barrier rather than wait there for ever."""
        sync = numpy.zeros(2, numpy.int64)  # a pair per call: an abandoned call keeps its own
        job = self._submit(function, arguments(1, sync))
        completed = False
        try:
            mine = function(*arguments(0, sync))
            completed = True
        finally:
            if not completed:
                sync[STATE] = GAVE_UP
            theirs = self._reply(job)
        return [mine, theirs]

    def _submit(self, function, args):
        """Hand function(*args) to the loop's second thread; returns the call's number."""
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
        Kept across calls: starting a thread for each call cost 5-6% of an epoch on a 2-core
        machine. It ends when this object goes."""
        if self._queues is None:
            self._queues = queue.SimpleQueue(), queue.SimpleQueue()
            threading.Thread(target=_serve, args=self._queues, name="xpnet-steps", daemon=True).start()
            weakref.finalize(self, self._queues[0].put, None)
        return self._queues

    def prepare(self, losses):
        """Compile the loop, and its count where steps are split, or load them from the disk cache
        (calls of no steps and no rows), never inside a timed epoch."""
        self.run(numpy.zeros(0, numpy.int64), 0, 0, numpy.zeros(0), losses, threads=1)
        if self.parts == SPLIT_PARTS:  # its outputs' types are count_correct's: C arrays
            inputs, labels = self.loop_buffers.inputs[:0], self.loop_buffers.labels[:0]
            count_correct_rows(BLAS, 0, 1, inputs, labels, self.model, self.loop_buffers.grads_y)
