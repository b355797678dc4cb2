"""The backend registry, interface conformance, and the errors of backends that cannot run."""

import inspect
import os
import subprocess
import sys

import pytest

from xpnet.backends import REGISTRY, Backend, _backend_class, available_backends, get_backend
from xpnet.errors import BackendUnavailable


def public_methods(cls):
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_") and name != "check_available"
    }


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backend_has_exactly_the_interface(name):
    """Same public methods, same signatures: a backend overrides, it never extends."""
    cls = _backend_class(name)  # importable without its library, so checked even without a GPU
    assert issubclass(cls, Backend)
    assert public_methods(cls) == public_methods(Backend)
    assert cls.name == name


def test_backends_are_independent_objects():
    a, b = get_backend("numpy"), get_backend("numpy")
    assert a is not b


def test_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("XPNET_BACKEND", "numba")
    assert get_backend().name == "numba"
    monkeypatch.delenv("XPNET_BACKEND")
    assert get_backend().name == "numpy"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendUnavailable, match="unknown backend 'jax': choose one of numpy, numba, cupy"):
        get_backend("jax")


def test_available_backends_lists_the_cpu_backends():
    names = available_backends()
    assert names[:2] == ["numpy", "numba"]
    assert ("cupy" in names) == _gpu_answers()


def _gpu_answers():
    try:
        _backend_class("cupy").check_available()
    except BackendUnavailable:
        return False
    return True


def run_train_cupy(prelude="", env=None):
    code = f"import sys; {prelude}from xpnet.cli import main; sys.exit(main(['train', '--backend', 'cupy']))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_exit_2(result, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cupy_not_installed_is_one_line_with_the_fix():
    result = run_train_cupy(prelude="sys.modules['cupy'] = None; ")  # makes `import cupy` fail
    assert_one_line_exit_2(result, "needs CuPy, which is not installed: pip install 'xpnet[cuda12]'")


def test_cupy_without_a_gpu_is_one_line_with_the_fix():
    pytest.importorskip("cupy", reason="CuPy is not installed here, so its no-GPU path cannot be exercised")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides every GPU, real or not
    result = run_train_cupy(env=env)
    assert_one_line_exit_2(result, "CuPy is installed but no usable GPU answered")
