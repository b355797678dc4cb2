"""Training on the real MNIST files (found through XPNET_DATA_DIR), and every accelerated
backend's agreement with NumPy through whole training runs. The 20-epoch runs are the slow
tier (`make test-slow`)."""

import dataclasses

import numpy
import pytest

from tests.cuda_host import CXX, DeviceArray, EmulatedCupyBackend
from xpnet.backends import get_backend
from xpnet.data import Split
from xpnet.data.synthetic import synthetic_splits
from xpnet.nn.fit import duration_text
from xpnet.nn.model import pixel_statistics
from xpnet.nn.train import TrainConfig, Trainer


@pytest.mark.slow
def test_seed_recipe_reaches_the_seeds_validation_accuracy(seed_recipe_history):
    """The seed notebook reached 0.969 after 20 epochs; we require >= 0.965."""
    history = seed_recipe_history(get_backend("numpy"))
    assert history.epochs[-1].val_accuracy >= 0.965
    assert history.test_accuracy >= 0.96


def test_two_epochs_reach_092(mnist_splits):
    history = Trainer(get_backend("numpy"), mnist_splits, TrainConfig(epochs=2)).fit(log=lambda line: None)
    assert history.epochs[-1].val_accuracy >= 0.92
    assert history.epochs[1].loss < history.epochs[0].loss


def first_batch_loss(trainer):
    return trainer.run_steps(1)[0]


def test_same_seed_gives_same_weights_and_first_loss(mnist_splits):
    runs = [Trainer(get_backend("numpy"), mnist_splits, TrainConfig(seed=7)) for _ in range(2)]
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        numpy.testing.assert_array_equal(a.value, b.value)
    assert first_batch_loss(runs[0]) == first_batch_loss(runs[1])
    other = Trainer(get_backend("numpy"), mnist_splits, TrainConfig(seed=8))
    assert not numpy.array_equal(other.model.parameters()[0].value, runs[0].model.parameters()[0].value)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the emulated CuPy backend")
@pytest.mark.parametrize("compiled, per_call", [(False, 2), (None, 1)])
def test_the_device_is_read_a_fixed_number_of_times_per_call_not_once_per_step(compiled, per_call):
    """On a GPU each host read of a device value is a copy and a wait. The emulated CuPy
    backend counts every such read: run_steps makes two whatever its length on the reference
    loop (the step losses, and the flag of the range checks done on the device) and one on the
    graphs (the losses: their labels were checked once, before), and an accuracy pass makes two."""
    config = TrainConfig(batch_size=256, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine")
    trainer = Trainer(EmulatedCupyBackend(), synthetic_splits(n_train=2048), config, compiled=compiled)
    trainer.prepare()
    reads = []
    for steps in (1, 6):
        before = DeviceArray.host_reads
        trainer.run_steps(steps)
        reads.append(DeviceArray.host_reads - before)
    assert reads == [per_call, per_call]
    before = DeviceArray.host_reads
    trainer.accuracy(trainer.train_x, trainer.train_y, batch_size=512)
    assert DeviceArray.host_reads - before == 2


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(12.345, "12.35 s"), (0.9996, "1.00 s"), (0.27, "270 ms"), (0.0997, "99.7 ms"), (0.00838, "8.38 ms")],
)
def test_epoch_lines_give_a_gpu_epochs_milliseconds(seconds, text):
    assert duration_text(seconds) == text


def test_normalisation_uses_training_split_statistics(mnist_splits):
    trainer = Trainer(get_backend("numpy"), mnist_splits, TrainConfig(epochs=1))
    pixels = mnist_splits.train.images.astype(numpy.float64)
    assert trainer.model.mean == pytest.approx(pixels.mean())
    assert trainer.model.std == pytest.approx(pixels.std())
    # The normalised training set has mean 0 and std 1 up to float32 rounding.
    x = trainer.train_x
    assert abs(float(x.mean(dtype=numpy.float64))) < 1e-5
    assert float(x.std(dtype=numpy.float64)) == pytest.approx(1.0, abs=1e-5)


def test_pixel_statistics_of_uint8_images_are_numpys_float64_ones(mnist_splits):
    """Counted by value rather than summed over a float64 copy: the same bits on MNIST, and within
    a few float64 roundings on any uint8 images (a constant image's std is exactly 0)."""
    pixels = mnist_splits.train.images.astype(numpy.float64)
    assert pixel_statistics(mnist_splits.train.images) == (pixels.mean(), pixels.std())
    rng = numpy.random.default_rng(3)
    for images in (rng.integers(0, 256, (500, 28, 28), dtype=numpy.uint8), numpy.full((3, 4), 7, numpy.uint8)):
        mean, std = pixel_statistics(images)
        as_float = images.astype(numpy.float64)
        assert mean == pytest.approx(as_float.mean(), rel=1e-14) and std == pytest.approx(as_float.std(), rel=1e-13)
    assert pixel_statistics(numpy.full((3, 4), 7, numpy.uint8)) == (7.0, 0.0)


# The README's recipe: 784-200-10 to >= 98.2% test accuracy in 20 epochs on every CPU backend.
RECIPE = TrainConfig(
    epochs=20, batch_size=128, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine"
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "numba", "cupy"], indirect=True)
def test_readme_recipe_reaches_982_test_accuracy(mnist_splits, backend):
    history = Trainer(backend, mnist_splits, RECIPE).fit(log=lambda line: None)
    assert history.test_accuracy >= 0.982


# The emulation's run takes 6 s: the slow tier (the fast-path tests compare its graphs in float64 too).
EMULATED_SLOW = pytest.param(EmulatedCupyBackend.name, marks=pytest.mark.slow)


@pytest.mark.parametrize("backend", ["numba", "cupy", EMULATED_SLOW], indirect=True)
def test_float64_training_matches_numpy_after_50_steps(mnist_splits, backend):
    # 50 steps of 128 read 6,400 rows: a training split of 8,192 real images serves them, and the
    # CPU emulation of CuPy copies a fifth of MNIST's bytes into each gather's guarded buffer.
    train = Split(mnist_splits.train.images[:8192], mnist_splits.train.labels[:8192])
    data = dataclasses.replace(mnist_splits, train=train)
    config = TrainConfig(dtype="float64", seed=3, batch_size=128)
    trainers = [Trainer(b, data, config) for b in (get_backend("numpy"), backend)]
    for trainer in trainers:
        trainer.run_steps(50)
    for ref, got in zip(*(t.model.parameters() for t in trainers)):
        numpy.testing.assert_allclose(backend.to_numpy(got.value), ref.value, rtol=1e-9, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numba", "cupy"], indirect=True)
def test_training_reaches_numpys_validation_accuracy(seed_recipe_history, backend):
    """The seed recipe on both backends: final validation accuracy within 0.3 points."""
    accuracy = seed_recipe_history(backend).epochs[-1].val_accuracy
    reference = seed_recipe_history(get_backend("numpy")).epochs[-1].val_accuracy
    assert accuracy >= 0.965
    assert abs(accuracy - reference) <= 0.003
