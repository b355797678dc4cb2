"""Numba backend: the base class with its hot elementwise and reduction ops as @njit kernels
(numba_kernels.py), and a compiled training loop (numba_steps.py). Matrix products stay with
NumPy's BLAS; writing a GEMM would only be slower. prepare() compiles (or loads from the disk
cache) every kernel for a dtype and reports the time, so it never lands in a timed epoch.
"""

import math
import time

import numpy

from xpnet.backends import deform, numba_deform, numba_steps, philox
from xpnet.backends import numba_kernels as kernels
from xpnet.backends.base import Backend, Declined, activation_code
from xpnet.backends.philox import Draw


def _c_contiguous(*arrays):
    return all(a.flags.c_contiguous for a in arrays)


class NumbaBackend(Backend):
    name = "numba"

    def prepare(self, dtype):
        """Compile (or load from cache) every kernel for dtype; returns the seconds taken."""
        start = time.perf_counter()
        x = numpy.ones((2, 3), dtype)
        W = numpy.ones((4, 3), dtype)
        b = numpy.zeros(4, dtype)
        labels = numpy.zeros(2, numpy.int64)
        y = self.linear_forward(x, W, b, "relu")
        self.linear_backward(x, W, y, activation="relu", output=y)
        z = numpy.empty_like(y)
        self.linear_forward(x, W, b, "gelu", pre_out=z)
        self.linear_backward(x, W, y, activation="gelu", pre_activation=z)
        self.linear_backward(x, W, y, grad_x=numpy.empty_like(x))
        self.softmax_cross_entropy(y, labels)
        self.count_correct(y, labels)
        self.sgd_update(W, numpy.zeros_like(W), 0.1)
        self.sgd_update(W, numpy.zeros_like(W), 0.1, numpy.zeros_like(W), 0.9, True, 1e-4)
        self.take_rows(x, labels)
        self.take_rows(labels, labels)
        self.dropout(x, 0.5, Draw(0, 0, 0))
        return time.perf_counter() - start

    def compile_steps(self, model, optimizer, data, batch_size):
        """The compiled loop (numba_steps.CompiledLoop), where it lowers this model and optimiser."""
        problem = numba_steps.lowering_problem(model, optimizer)
        if problem is not None:
            return Declined(f"numba's compiled loop does not run this: {problem}")
        return numba_steps.CompiledLoop(model, optimizer, data, batch_size)

    def _outside(self, values, stop):
        return kernels.outside(values, stop)  # one pass, no temporaries: 0.2 us for a batch's labels, against 1.7

    def _take_rows(self, source, indices, out):
        if not _c_contiguous(source, out):  # the kernel sees rows as flat runs of memory
            return super()._take_rows(source, indices, out)
        # One 2-D kernel serves images and labels alike (labels as one-column rows).
        kernels.take_rows(source.reshape(len(source), -1), indices, out.reshape(len(out), -1))
        return out

    def _linear_forward(self, x, W, b, activation, out, pre_out):
        if activation == "gelu":  # kernels of its own: the compiled loop's inline the others
            z = out if pre_out is None else pre_out
            numpy.matmul(x, W.T, out=z)
            kernels.add_bias_gelu(z, b, out)
            return out
        numpy.matmul(x, W.T, out=out)
        kernels.add_bias_activate(out, b, activation_code(activation))
        return out

    def _linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x, activation, saved, grad_z):
        if activation == "gelu":
            kernels.gelu_grad_and_sum_rows(grad_y, saved, grad_z, grad_b)
        else:
            saved = grad_y if saved is None else saved  # unread for identity, but the kernel wants an array
            kernels.activation_grad_and_sum_rows(grad_y, saved, activation_code(activation), grad_z, grad_b)
        numpy.matmul(grad_z.T, x, out=grad_W)
        if grad_x is not None:
            numpy.matmul(grad_z, W, out=grad_x)

    def _dropout(self, x, threshold, scale, draw, out, mask):
        if not _c_contiguous(x, out, mask):  # the kernel numbers elements as they lie in memory
            return super()._dropout(x, threshold, scale, draw, out, mask)
        words = map(numpy.uint64, (threshold, draw.step, draw.layer, draw.epoch, *draw.key()))
        threshold, step, layer, epoch, k0, k1 = words
        kernels.dropout(x.reshape(-1), threshold, scale, step, layer, epoch, k0, k1, out.reshape(-1), mask.reshape(-1))
        return out

    def _deform_rows(self, source, rows, spec, seed, epoch, background, out):
        if not _c_contiguous(source, out):
            return super()._deform_rows(source, rows, spec, seed, epoch, background, out)
        side = math.isqrt(source.shape[1])
        ranges = tuple(deform.kernel_ranges(spec, side))
        weights = deform.gaussian_weights(spec.sigma)
        seed_words = tuple(map(numpy.uint64, philox.Draw(seed, epoch, 0).key()))
        numba_deform.deform_rows(source, rows, side, ranges, weights, seed_words, numpy.uint64(epoch), background, out)
        return out

    def _softmax_cross_entropy(self, logits, labels, grad):
        return logits.dtype.type(kernels.softmax_cross_entropy(logits, labels, grad, logits.shape[0]))

    def _count_correct(self, logits, labels):
        return numpy.asarray(kernels.count_correct(logits, labels))

    def _sgd_update(self, param, grad, lr, velocity, momentum, nesterov, weight_decay):
        if velocity is None:  # the kernel reads velocity only when momentum is set
            velocity, momentum = param, 0.0
        if not _c_contiguous(param, grad, velocity):  # the kernel walks them as one flat run each
            return super()._sgd_update(
                param, grad, lr, velocity if momentum else None, momentum, nesterov, weight_decay
            )
        flat = (param.reshape(-1), grad.reshape(-1))
        kernels.sgd_update(*flat, lr, velocity.reshape(-1), momentum, nesterov, weight_decay)
