"""Shared by tests/ and bench/: the backend fixture, parametrised over every registered backend."""

import pytest

from xpnet.backends import REGISTRY, get_backend
from xpnet.errors import BackendUnavailable


@pytest.fixture(params=list(REGISTRY))
def backend(request):
    """Each registered backend; one that cannot run here is skipped with its own reason."""
    try:
        return get_backend(request.param)
    except BackendUnavailable as exc:
        pytest.skip(f"{request.param} backend unavailable here: {exc}")
