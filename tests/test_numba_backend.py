"""Numba-specific behaviour: compile caching, and agreement with NumPy through whole training."""

import os
import subprocess
import sys

import numpy

from xpnet.backends import get_backend
from xpnet.nn.train import TrainConfig, Trainer

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


def test_float64_training_matches_numpy_after_50_steps(mnist_splits):
    config = TrainConfig(dtype="float64", seed=3)
    trainers = [Trainer(get_backend(name), mnist_splits, config) for name in ("numpy", "numba")]
    for trainer in trainers:
        order = trainer.backend.asarray(trainer.rng.permutation(len(trainer.train_y)))
        for _, (x, y) in zip(range(50), trainer.batches(order)):
            trainer.step(x, y)
    for ref, got in zip(*(t.model.parameters() for t in trainers)):
        numpy.testing.assert_allclose(got.value, ref.value, rtol=1e-9, atol=0)


def test_numba_training_reaches_numpys_validation_accuracy(seed_recipe_history):
    """The seed recipe on both backends: final validation accuracy within 0.3 points."""
    accuracy = {name: seed_recipe_history(name).epochs[-1].val_accuracy for name in ("numpy", "numba")}
    assert accuracy["numba"] >= 0.965
    assert abs(accuracy["numba"] - accuracy["numpy"]) <= 0.003
