"""Numba-specific behaviour: where its compiled kernels are cached, and what happens without a cache."""

import os
import subprocess
import sys

PREPARE = "from xpnet.backends import get_backend; print(get_backend('numba').prepare('float32'))"


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_kernels_cache_in_numba_cache_dir_when_the_package_dir_is_not_used(tmp_path):
    """As for a read-only install: the in-tree cache is unusable, NUMBA_CACHE_DIR serves."""
    result = run_python(PREPARE, NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator", NUMBA_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.rglob("*.nbi")), "no Numba cache index was written"
    assert "compiled on every run" not in result.stderr


def test_no_writable_cache_falls_back_to_compiling_with_one_warning():
    # Only the zip-file locator, which serves no ordinary file: no cache location at all.
    result = run_python(PREPARE, NUMBA_CACHE_LOCATOR_CLASSES="ZipCacheLocator")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Numba kernels will be compiled on every run") == 1
    assert float(result.stdout) > 0
