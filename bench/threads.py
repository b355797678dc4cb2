"""Serial against parallel=True (prange) versions of the Numba backend's memory-bound kernels:
first each kernel alone, at the real sizes of a 512-sample step of 784-200-10 in float32
(microseconds per call, median of 5 rounds of 300 calls), then whole training epochs with the
parallel gather and SGD update swapped in (samples/s, median of 5 interleaved epochs), where
Numba's threads meet OpenBLAS's. Run: python bench/threads.py

The serial kernels are the backend's own; the parallel ones are written here only to be
measured (src/xpnet/backends/numba_kernels.py says what was chosen and why).
"""

import statistics
import time

import numpy
from numba import njit, prange

from xpnet.backends.numba_backend import NumbaBackend
from xpnet.backends.numba_kernels import RELU, activation_grad_and_sum_rows, sgd_update, take_rows
from xpnet.bench import backend_contender, time_interleaved


@njit(parallel=True, nogil=True)
def take_rows_parallel(source, indices, out):
    for i in prange(indices.size):
        row = indices[i]
        for j in range(source.shape[1]):
            out[i, j] = source[row, j]


@njit(parallel=True, nogil=True)
def sgd_parallel(param, grad, lr):  # plain SGD, the rule the training below uses
    for i in prange(param.size):
        param[i] -= lr * grad[i]


@njit(parallel=True, nogil=True)
def mask_and_sum_columns_parallel(grad_y, relu_output, grad_z, grad_b):
    for j in prange(grad_y.shape[1]):  # a column per thread: no shared accumulator
        total = grad_y.dtype.type(0)
        for i in range(grad_y.shape[0]):
            grad_z[i, j] = grad_y[i, j] * (relu_output[i, j] > 0)
            total += grad_z[i, j]
        grad_b[j] = total


class ParallelGatherAndUpdate(NumbaBackend):
    name = "numba, parallel gather + SGD"

    def _take_rows(self, source, indices, out):
        take_rows_parallel(source.reshape(len(source), -1), indices, out.reshape(len(out), -1))
        return out

    def _sgd_update(self, param, grad, lr, velocity, momentum, nesterov, weight_decay):
        if momentum or weight_decay:  # only plain SGD is measured here
            return super()._sgd_update(param, grad, lr, velocity, momentum, nesterov, weight_decay)
        sgd_parallel(param.reshape(-1), grad.reshape(-1), lr)


def microseconds(fn, calls=300, rounds=5):
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main():
    rng = numpy.random.default_rng(0)
    data = rng.standard_normal((50_000, 784)).astype(numpy.float32)
    rows = rng.permutation(50_000)[:512]
    batch = numpy.empty((512, 784), numpy.float32)
    W, grad_W = (rng.standard_normal((200, 784)).astype(numpy.float32) for _ in range(2))
    grad_y, relu_output = (rng.standard_normal((512, 200)).astype(numpy.float32) for _ in range(2))
    grad_z, grad_b = numpy.empty((512, 200), numpy.float32), numpy.empty(200, numpy.float32)
    flat_W, flat_grad = W.reshape(-1), grad_W.reshape(-1)
    cases = {
        "gather 512 x 784": (lambda: take_rows(data, rows, batch), lambda: take_rows_parallel(data, rows, batch)),
        "SGD update 200 x 784": (
            lambda: sgd_update(flat_W, flat_grad, 1e-12, flat_W, 0.0, False, 0.0),
            lambda: sgd_parallel(flat_W, flat_grad, 1e-12),
        ),
        "ReLU mask + bias-grad sum 512 x 200": (
            lambda: activation_grad_and_sum_rows(grad_y, relu_output, RELU, grad_z, grad_b),
            lambda: mask_and_sum_columns_parallel(grad_y, relu_output, grad_z, grad_b),
        ),
    }
    print(f"{'kernel':<38}{'serial us':>10}{'parallel us':>13}")
    for name, (serial, parallel) in cases.items():
        print(f"{name:<38}{microseconds(serial):>10.1f}{microseconds(parallel):>13.1f}")
    print(f"\n{'training epoch, samples/s':<38}{'serial':>10}{'parallel':>13}")
    for batch in (128, 512):
        contenders = [backend_contender(b, batch) for b in (NumbaBackend(), ParallelGatherAndUpdate())]
        serial, parallel = (50_000 / statistics.median(s) for s in time_interleaved(contenders, repeats=5))
        print(f"{f'batch {batch}':<38}{serial:>10,.0f}{parallel:>13,.0f}")


if __name__ == "__main__":
    main()
