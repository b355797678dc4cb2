"""Backend registry: pick an array backend by name at run time.

Backends are imported lazily, so ``--backend numpy`` never pays for importing Numba or CuPy,
and a backend whose library is missing fails with one line that says how to install it.
"""

import importlib
import os

from xpnet.backends.base import Backend
from xpnet.errors import BackendUnavailable

ENV_VAR = "XPNET_BACKEND"
DEFAULT = "numpy"

# name -> "module:class"; tests may register extra (deliberately wrong) backends here.
REGISTRY = {
    "numpy": "xpnet.backends.numpy_backend:NumpyBackend",
    "numba": "xpnet.backends.numba_backend:NumbaBackend",
    "cupy": "xpnet.backends.cupy_backend:CupyBackend",
}


def _backend_class(name):
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise BackendUnavailable(f"unknown backend {name!r}: choose one of {known}")
    module_name, class_name = REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} cannot be imported ({exc}); reinstall xpnet with its dependencies"
        ) from exc
    return getattr(module, class_name)


def get_backend(name=None):
    """A new backend object; name defaults to $XPNET_BACKEND, then numpy."""
    name = name or os.environ.get(ENV_VAR) or DEFAULT
    backend_class = _backend_class(name)
    check = getattr(backend_class, "check_available", None)
    if check is not None:
        check()  # raises BackendUnavailable with the reason and the fix
    return backend_class()


def available_backends():
    """Names of the backends that can run here (cupy only when a GPU answers)."""
    names = []
    for name in REGISTRY:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


__all__ = ["Backend", "REGISTRY", "available_backends", "get_backend"]
