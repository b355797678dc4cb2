"""NumPy's own BLAS, reached through ctypes, for the Numba backend's compiled loop, and what was
measured about it. No Numba here: `xpnet bench` reads the layout threshold without loading it.

The loop calls the BLAS NumPy itself uses (its bundled ILP64 OpenBLAS): Numba's own np.dot,
through SciPy's OpenBLAS, was 5-15% slower at batch 128 and 512 (bench/history.md).
"""

import contextlib
import ctypes
import importlib

# Below this many rows the loop keeps layer outputs feature-major (the transpose of a C array):
# OpenBLAS computes out.T = W @ x.T 2.6x faster than out = x @ W.T at batch 16 and 1.3x at 64,
# while from 128 rows the strided elementwise passes over such outputs cost more than that.
FEATURE_MAJOR_BELOW = 128


def _numpy_routines(patterns, verbs):
    """The first group of routines named pattern.format(verb), for a pattern, found in NumPy's
    own extension module (dlsym searches the BLAS it bundles too); or None."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            library = ctypes.CDLL(importlib.import_module(module).__file__)
        except (ImportError, OSError):
            continue
        for pattern in patterns:
            names = [pattern.format(verb) for verb in verbs]
            if all(hasattr(library, name) for name in names):
                return tuple(getattr(library, name) for name in names)
    return None


def numpy_blas():
    """NumPy's own sgemm, dgemm, sgemv, dgemv (ILP64 CBLAS), typed for ctypes; or None."""
    routines = _numpy_routines(("scipy_cblas_{}64_", "cblas_{}64_"), ("sgemm", "dgemm", "sgemv", "dgemv"))
    if routines is None:
        return None
    flag, size, pointer = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    for routine, real in zip(routines[:2], (ctypes.c_float, ctypes.c_double)):
        # order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
        routine.argtypes = [flag, flag, flag, size, size, size, real, pointer, size, pointer, size, real, pointer, size]
    for routine, real in zip(routines[2:], (ctypes.c_float, ctypes.c_double)):
        # order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy
        routine.argtypes = [flag, flag, size, size, real, pointer, size, pointer, size, real, pointer, size]
    for routine in routines:
        routine.restype = None
    return routines


def numpy_blas_threads():
    """(get, set) of the thread count of NumPy's own OpenBLAS, typed for ctypes; or None."""
    routines = _numpy_routines(("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_"), ("get", "set"))
    if routines is None:
        return None
    get, set_ = routines
    get.argtypes, get.restype = [], ctypes.c_int
    set_.argtypes, set_.restype = [ctypes.c_int], None
    return get, set_


BLAS = numpy_blas()
BLAS_THREADS = numpy_blas_threads()


@contextlib.contextmanager
def one_blas_thread():
    """NumPy's OpenBLAS on one thread inside the block."""
    get_threads, set_threads = BLAS_THREADS
    previous = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)
