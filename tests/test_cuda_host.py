"""The CPU emulation of CuPy's kernel API (tests/cuda_host.py) is itself tested here, since
the CuPy backend's tests on machines without a GPU rest on it: every thread runs, stray writes
and wrongly typed arguments fail, and ElementwiseKernel broadcasts and binds T as CuPy does."""

import numpy
import pytest

from tests.cuda_host import CXX, ElementwiseKernel, RawModule

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to build the emulated kernels")

SOURCE = r"""
__global__ void stamp(int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 1000 * blockIdx.x + threadIdx.x;
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
    return RawModule(SOURCE, options=("--std=c++14",), name_expressions=["stamp", "stamp_unguarded", "add_one<float>"])


def test_a_launch_runs_every_thread_of_every_block(module):
    out = numpy.full(12, -1, numpy.int32)
    module.get_function("stamp")((3,), (4,), (out, numpy.int32(12)))
    numpy.testing.assert_array_equal(out, [1000 * b + t for b in range(3) for t in range(4)])


def test_a_write_past_the_array_is_caught(module):
    out = numpy.zeros(10, numpy.int32)
    with pytest.raises(AssertionError, match="stamp_unguarded .* argument 1, wrote outside the argument's 40 bytes"):
        module.get_function("stamp_unguarded")((1,), (128,), (out, numpy.int32(10)))


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
