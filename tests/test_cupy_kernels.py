"""The CuPy backend's raw CUDA kernels, compiled to PTX with nvcc: this catches syntax and type
errors on machines without a GPU (nothing compiled here runs). Skipped where nvcc is absent."""

import shutil
import subprocess

import pytest

from xpnet.backends import cupy_backend

NVCC = shutil.which("nvcc")
INSTANTIATIONS = """
template __global__ void mask_and_sum_rows<{T}>({T}*, const {T}*, bool, {T}*, int, int);
template __global__ void softmax_cross_entropy<{T}>(const {T}*, const long long*, {T}*, double*, int, int);
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here, so the CUDA sources cannot be compiled")
def test_raw_kernels_compile_to_ptx_for_both_dtypes(tmp_path):
    source = cupy_backend._MASK_AND_SUM_ROWS + cupy_backend._SOFTMAX_CROSS_ENTROPY
    source += "".join(INSTANTIATIONS.format(T=t) for t in ("float", "double"))
    (tmp_path / "kernels.cu").write_text(source)
    result = subprocess.run(
        [NVCC, "-ptx", "-arch=sm_90", "--std=c++14", "kernels.cu", "-o", "kernels.ptx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "kernels.ptx").read_text()
    assert ptx.count(".entry") == 4  # two kernels, each for float and double


def elementwise_as_cuda(name, spec, dtype):
    """An ElementwiseKernel spec as a plain CUDA kernel, declaring its parameters the way CuPy's
    generated code does (inputs const, outputs writable references, one element per thread)."""
    inputs, outputs, body = spec
    declarations, arguments = [], []
    for kind, params in (("in", inputs), ("out", outputs)):
        for param in params.split(","):
            type_name, var = param.split()
            c_type = dtype if type_name == "T" else type_name
            arguments.append(f"{c_type}* {var}_")
            const = "const " if kind == "in" else ""
            declarations.append(f"{const}{c_type}& {var} = {var}_[i];")
    return (
        f"__global__ void {name}({', '.join(arguments)}, int n) {{\n"
        f"  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= n) return;\n"
        f"  typedef {dtype} T;\n  " + "\n  ".join(declarations) + f"\n  {body}\n}}\n"
    )


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here, so the CUDA sources cannot be compiled")
def test_elementwise_kernel_bodies_compile_for_both_dtypes(tmp_path):
    source = "".join(
        elementwise_as_cuda(f"{name}_{dtype}", spec, dtype)
        for name, spec in (("add_bias_relu", cupy_backend._ADD_BIAS_RELU), ("sgd_update", cupy_backend._SGD_UPDATE))
        for dtype in ("float", "double")
    )
    (tmp_path / "elementwise.cu").write_text(source)
    result = subprocess.run(
        [NVCC, "-ptx", "-arch=sm_90", "elementwise.cu", "-o", "elementwise.ptx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + source
    assert (tmp_path / "elementwise.ptx").read_text().count(".entry") == 4
