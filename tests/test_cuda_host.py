"""The CPU emulation of CuPy's kernel API (tests/cuda_host.py) is itself tested here, since
the CuPy backend's tests on machines without a GPU rest on it: every thread runs, stray writes
and wrongly typed arguments fail, a block's threads meet at __syncthreads (a missing barrier
gives a wrong result, a skipped one an error), and ElementwiseKernel broadcasts and binds T as
CuPy does. The backend's own kernels with one mutation each (a barrier or a bounds guard taken
out) fail here too: the emulation would catch that mistake in the backend."""

import numpy
import pytest

from tests.cuda_host import CXX, ElementwiseKernel, RawModule
from xpnet.backends import cupy_backend
from xpnet.backends.base import activation_code

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to build the emulated kernels")

SOURCE = r"""
__global__ void stamp(int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 1000 * blockIdx.x + threadIdx.x;
}
__global__ void copy_one_past(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = in[i];  // `<=`: the last thread reads past in and writes past out
}
__global__ void stamp_unguarded(int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = 1;  // no `if (i < n)`: threads past n write past the array
}
template <typename T>
__global__ void add_one(T* out, const T* in, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i] + 1;
}
"""


@pytest.fixture(scope="module")
def module():
    names = ["stamp", "stamp_unguarded", "add_one<float>", "copy_one_past"]
    return RawModule(SOURCE, options=("--std=c++14",), name_expressions=names)


def test_a_launch_runs_every_thread_of_every_block(module):
    out = numpy.full(12, -1, numpy.int32)
    module.get_function("stamp")((3,), (4,), (out, numpy.int32(12)))
    numpy.testing.assert_array_equal(out, [1000 * b + t for b in range(3) for t in range(4)])


def test_a_write_past_the_array_is_caught(module):
    out = numpy.zeros(10, numpy.int32)
    with pytest.raises(AssertionError, match="stamp_unguarded .* argument 1, wrote outside the argument's 40 bytes"):
        module.get_function("stamp_unguarded")((1,), (128,), (out, numpy.int32(10)))


def test_a_stray_read_written_past_another_array_is_caught(module):
    """Each float argument's bands hold bytes of their own, so what a stray read copies from one
    argument's band into another's changes it."""
    data, out = numpy.arange(10, dtype=numpy.float32), numpy.zeros(10, numpy.float32)
    with pytest.raises(AssertionError, match="copy_one_past .* argument 2, wrote outside the argument's 40 bytes"):
        module.get_function("copy_one_past")((1,), (16,), (data, out, numpy.int32(10)))


@pytest.mark.parametrize(
    "args, message",
    [
        ((numpy.zeros(4), numpy.zeros(4, numpy.float32), numpy.int32(4)), "argument 1 .* float64 array .* float\\*"),
        ((numpy.zeros(4, numpy.float32), numpy.zeros(4, numpy.float32), 4), "argument 3 .* Python int .* type int"),
        ((numpy.zeros(4, numpy.float32), numpy.zeros(8, numpy.float32)[::2], numpy.int32(4)), "non-contiguous"),
        ((numpy.zeros(4, numpy.float32), numpy.int32(4)), "takes 3 arguments, got 2"),
    ],
)
def test_arguments_of_the_wrong_c_type_are_refused(module, args, message):
    with pytest.raises(TypeError, match=message):
        module.get_function("add_one<float>")((1,), (4,), args)


def test_an_array_passed_twice_is_one_array(module):
    data = numpy.arange(5, dtype=numpy.float32)
    module.get_function("add_one<float>")((1,), (8,), (data, data, numpy.int32(5)))
    numpy.testing.assert_array_equal(data, numpy.arange(1, 6))


def test_elementwise_kernel_broadcasts_inputs_and_casts_scalars_to_t():
    kernel = ElementwiseKernel("T b, T scale, bool flag", "T y", "y = flag ? y * scale + b : y", "scale_add")
    y = numpy.ones((3, 4), numpy.float64)
    kernel(numpy.arange(4.0), 2, True, y)
    numpy.testing.assert_array_equal(y, numpy.tile(numpy.arange(4.0) + 2, (3, 1)))
    kernel(numpy.arange(4.0), 2, False, y)
    numpy.testing.assert_array_equal(y, numpy.tile(numpy.arange(4.0) + 2, (3, 1)))


def test_elementwise_kernel_refuses_two_dtypes_for_t():
    kernel = ElementwiseKernel("T b", "T y", "y += b", "add")
    with pytest.raises(TypeError, match="type T is bound to \\['float32', 'float64'\\]"):
        kernel(numpy.ones(3, numpy.float32), numpy.ones(3))


LOSS_BARRIER = "partial[threadIdx.x] = sum;\n    __syncthreads();"
SUM_BARRIER = "partial[lane][column] = sum;\n    __syncthreads();"


def block_kernel(source, name, reverse=False):
    module = RawModule(source, options=("--std=c++14",), name_expressions=[name], reverse_threads=reverse)
    return module.get_function(name)


def mean_loss(source, rows=700, cols=10, reverse=False):
    """The block kernel's mean loss of random logits, and NumPy's (more rows than threads, so
    each thread sums several)."""
    rng = numpy.random.default_rng(0)
    logits, labels = rng.standard_normal((rows, cols)), rng.integers(0, cols, rows)
    grad, loss = numpy.empty((rows, cols)), numpy.full(1, numpy.nan)
    args = (logits, labels, grad, loss, numpy.int32(rows), numpy.int32(cols))
    block_kernel(source, "softmax_cross_entropy<double>", reverse)((1,), (cupy_backend.LOSS_THREADS,), args)
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = numpy.mean(numpy.log(numpy.exp(shifted).sum(axis=1)) - shifted[numpy.arange(rows), labels])
    return loss[0], expected


def relu_bias_gradient(source, rows=100, cols=40, reverse=False):
    """The block kernel's masked gradient and its column sums over two blocks of columns, and NumPy's."""
    rng = numpy.random.default_rng(1)
    grad_y, output = rng.standard_normal((rows, cols)), numpy.maximum(rng.standard_normal((rows, cols)), 0)
    grad_z, sums = numpy.full((rows, cols), numpy.nan), numpy.full(cols, numpy.nan)
    code = numpy.int32(activation_code("relu"))
    args = (grad_y, output, code, grad_z, sums, numpy.int32(rows), numpy.int32(cols))
    threads = cupy_backend.SUM_COLUMNS * cupy_backend.SUM_LANES
    block_kernel(source, "activation_grad_and_sum_rows<double>", reverse)((2,), (threads,), args)
    expected = numpy.where(output > 0, grad_y, 0)
    numpy.testing.assert_array_equal(grad_z, expected)
    return sums, expected.sum(axis=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["thread order", "reverse order"])
@pytest.mark.parametrize("run", [mean_loss, relu_bias_gradient])
def test_a_block_meets_at_its_barriers(run, reverse):
    got, expected = run(cupy_backend.BLOCK_SOURCE, reverse=reverse)
    numpy.testing.assert_allclose(got, expected, rtol=1e-13)  # float64 sums of at most 700 terms, in another order


@pytest.mark.parametrize("run, barrier", [(mean_loss, LOSS_BARRIER), (relu_bias_gradient, SUM_BARRIER)])
def test_a_missing_barrier_gives_a_wrong_sum(run, barrier):
    # Without the barrier, the threads that add the partial sums read slots the others have not yet written.
    assert cupy_backend.BLOCK_SOURCE.count(barrier) == 1
    source = cupy_backend.BLOCK_SOURCE.replace(barrier, barrier.split("\n")[0])
    got, expected = run(source)
    assert numpy.max(numpy.abs(got - expected)) > 1e-3 * numpy.max(numpy.abs(expected))


def test_a_barrier_some_threads_skip_is_an_error():
    early_return = "if (threadIdx.x == 3) return; partial[threadIdx.x] = sum;"
    source = cupy_backend.BLOCK_SOURCE.replace("partial[threadIdx.x] = sum;", early_return)
    with pytest.raises(AssertionError, match="block 0: 1 threads ended while 511 waited at barrier 1"):
        mean_loss(source)


def test_the_batch_gather_without_its_bounds_guard_writes_past_the_batch():
    source = cupy_backend.RAW_SOURCE.replace("if (k >= (long long)n * cols) return;", "")
    assert source != cupy_backend.RAW_SOURCE
    kernel = RawModule(source, options=("--std=c++14",), name_expressions=["take_batch<float>"])
    images, labels = numpy.ones((50, 7), numpy.float32), numpy.arange(50, dtype=numpy.int64)
    rows = numpy.arange(20, dtype=numpy.int64)  # a chunk's rows, as a graph passes them: more than the batch
    batch, batch_labels = numpy.empty((5, 7), numpy.float32), numpy.empty(5, numpy.int64)
    args = (images, labels, rows, batch, batch_labels, numpy.int32(5), numpy.int32(7))
    with pytest.raises(AssertionError, match="wrote outside the argument"):
        kernel.get_function("take_batch<float>")((1,), (128,), args)
