"""The Numba backend's compiled training loop (xpnet/backends/numba_steps.py) against its own
reference loop: the same kernels and the same BLAS calls, so the same bits, at any depth,
dtype, batch size (1 included, where the products are gemv) and optimiser option."""

import numpy
import pytest

import xpnet
from tests.cuda_host import EmulatedCupyBackend
from xpnet.backends import numba_steps
from xpnet.data.synthetic import synthetic_splits

pytestmark = pytest.mark.skipif(numba_steps.BLAS is None, reason="NumPy's own BLAS routines were not found here")

OPTIONS = {
    "plain": {},
    "nesterov-decay-cosine": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "schedule": "cosine"},
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("hidden", [(200,), (32, 16, 8)])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_compiled_steps_equal_the_reference_loop_bit_for_bit(dtype, batch, hidden, options):
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=hidden, dtype=dtype, lr=0.01, **OPTIONS[options])
    compiled = xpnet.Trainer("numba", data, config)
    stepwise = xpnet.Trainer("numba", data, config, compiled=False)
    assert compiled.compiled_steps is not None and stepwise.compiled_steps is None
    steps = min(30, compiled.steps_per_epoch)
    numpy.testing.assert_array_equal(compiled.run_steps(steps), stepwise.run_steps(steps))
    for got, expected in zip(compiled.model.parameters(), stepwise.model.parameters()):
        numpy.testing.assert_array_equal(got.value, expected.value)
    for got, expected in zip(compiled.optimizer.velocities, stepwise.optimizer.velocities):
        assert (got is None) == (expected is None)
        if got is not None:
            numpy.testing.assert_array_equal(got, expected)
    assert compiled.optimizer.steps_taken == stepwise.optimizer.steps_taken == steps


class Progress:
    def __init__(self):
        self.updates = []

    def update(self, n=1):
        self.updates.append(n)


def test_a_compiled_epoch_runs_in_chunks_that_move_the_progress_bar():
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=4000), xpnet.TrainConfig(batch_size=40))
    progress = Progress()
    trainer.run_steps(progress=progress)
    assert sum(progress.updates) == trainer.steps_per_epoch == 100
    assert len(progress.updates) == 20  # a twentieth of the epoch at a time: Ctrl-C waits no longer


@pytest.mark.parametrize("backend", ["numpy", EmulatedCupyBackend.name], indirect=True)
def test_backends_without_a_compiled_loop_run_the_reference_one(backend):
    trainer = xpnet.Trainer(backend, synthetic_splits(n_train=256), xpnet.TrainConfig(batch_size=64))
    assert trainer.compiled_steps is None
    assert numpy.isfinite(trainer.run_steps()).all()


def test_without_numpys_blas_numba_falls_back_to_the_reference_loop(monkeypatch):
    monkeypatch.setattr(numba_steps, "BLAS", None)
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=256), xpnet.TrainConfig(batch_size=64))
    assert trainer.compiled_steps is None and numpy.isfinite(trainer.run_steps()).all()
