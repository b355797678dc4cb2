"""The CuPy backend's CUDA kernels compiled to PTX with nvcc: this catches what CUDA's compiler
refuses and the host compiler of the CPU emulation (tests/cuda_host.py) might accept, on
machines without a GPU (nothing compiled here runs). Skipped where nvcc is absent."""

import shutil
import subprocess

import pytest

from tests.cuda_host import elementwise_as_cuda
from xpnet.backends import cupy_backend

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here, so the CUDA sources cannot be compiled")
@pytest.mark.parametrize(
    "source, kernels, count",
    [
        (cupy_backend.RAW_SOURCE, cupy_backend.RAW_KERNELS, 11),  # five templates in two dtypes, check_range
        (cupy_backend.BLOCK_SOURCE, cupy_backend.BLOCK_KERNELS, 10),  # bias gradient, loss, deform, head's two
    ],
    ids=["raw", "block"],
)
def test_raw_kernels_compile_to_ptx_for_both_dtypes(tmp_path, source, kernels, count):
    # Taking each kernel's address, by the name CuPy looks it up by, instantiates the templates.
    addresses = ", ".join(f"(void*)&{name}" for name in kernels)
    source = source + f"void* kernel_addresses[] = {{{addresses}}};\n"
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
    assert ptx.count(".entry") == len(kernels) == count


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here, so the CUDA sources cannot be compiled")
def test_elementwise_kernel_bodies_compile_for_both_dtypes(tmp_path):
    source = cupy_backend.ELEMENTWISE_PREAMBLE + "".join(
        elementwise_as_cuda(f"{name}_{dtype}", spec, dtype)
        for name, spec in cupy_backend.ELEMENTWISE_KERNELS.items()
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
    assert (tmp_path / "elementwise.ptx").read_text().count(".entry") == 2 * len(cupy_backend.ELEMENTWISE_KERNELS)
