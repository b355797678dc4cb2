"""Shared by tests/ and bench/: the backend fixture, over every registered backend and the CuPy
backend emulated on the CPU (tests/cuda_host.py), which runs its CUDA kernels where no GPU is."""

import pytest

from xpnet.backends import REGISTRY, get_backend
from xpnet.errors import BackendUnavailable

EMULATED_CUPY = "cupy-emulated"  # EmulatedCupyBackend.name, without importing the emulation here


@pytest.fixture(params=[*REGISTRY, EMULATED_CUPY])
def backend(request):
    """Each backend; one that cannot run here is skipped with its own reason."""
    if request.param == EMULATED_CUPY:
        from tests.cuda_host import CXX, EmulatedCupyBackend

        if CXX is None:
            pytest.skip("no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
        return EmulatedCupyBackend()
    try:
        return get_backend(request.param)
    except BackendUnavailable as exc:
        pytest.skip(f"{request.param} backend unavailable here: {exc}")
