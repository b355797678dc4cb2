"""xpnet as a library: the README's example as written, the public names, the trainer's step
API and exact resume from any step, and predict's contract for the images it takes."""

import dataclasses
import re
from pathlib import Path

import numpy
import pytest

import xpnet
from tests.cuda_host import CXX, EmulatedCupyBackend
from xpnet.data.synthetic import synthetic_splits
from xpnet.errors import ArgumentError, ConfigError, DataError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example():
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow  # on real MNIST; tests/test_docs.py runs it on generated data in the quick tier
def test_the_readme_python_example_runs_as_written(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it saves a file where it runs
    namespace = {}
    exec(compile(readme_python_example(), str(README), "exec"), namespace)
    assert (tmp_path / "mnist-mlp.npz").is_file()
    assert namespace["history"].test_accuracy > 0.9
    labels = namespace["data"].test.labels[:8]
    assert (namespace["model"].predict(namespace["data"].test.images[:8]) == labels).mean() >= 0.75
    assert "Test accuracy" in capsys.readouterr().out


def test_every_public_name_and_method_is_documented():
    for name in xpnet.__all__:
        thing = getattr(xpnet, name)
        assert thing.__doc__ and not thing.__doc__.startswith(f"{name}("), f"xpnet.{name} has no docstring"
        public = (
            [m for m, f in vars(thing).items() if callable(f) and not m.startswith("_")]
            if isinstance(thing, type)
            else []
        )
        for method in public:
            assert getattr(thing, method).__doc__, f"xpnet.{name}.{method} has no docstring"


@pytest.fixture(scope="module")
def model_path(mnist_splits, tmp_path_factory):
    """A model trained one epoch on real MNIST (about 92% accurate), saved on its own."""
    trainer = xpnet.Trainer("numpy", mnist_splits, xpnet.TrainConfig(epochs=1))
    trainer.fit(log=lambda line: None)
    path = tmp_path_factory.mktemp("model") / "model.npz"
    trainer.model.save(path)
    return path


def test_predict_takes_uint8_and_float_images_of_the_same_digits_alike(backend, model_path, mnist_splits):
    model = xpnet.load_model(model_path, backend)
    digits, labels = mnist_splits.test.images[:500], mnist_splits.test.labels[:500]
    predicted = model.predict(digits)
    assert predicted.dtype == numpy.int64 and (predicted == labels).mean() > 0.85
    for floats in (digits.astype(numpy.float32) / 255, digits / 255.0, (digits / 255.0).reshape(500, 784)):
        numpy.testing.assert_array_equal(model.predict(floats), predicted)
    probabilities = model.predict_proba(digits)
    numpy.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
    numpy.testing.assert_array_equal(probabilities.argmax(axis=1), predicted)
    numpy.testing.assert_allclose(model.predict_proba(digits / 255.0), probabilities, atol=1e-5)
    assert model.predict(digits[0]) == predicted[0] and isinstance(model.predict(digits[0]), int)


def test_an_empty_batch_gets_empty_answers(backend, model_path):
    """As NumPy answers an empty array, and without a kernel launched on no rows."""
    model = xpnet.load_model(model_path, backend)
    for empty in (numpy.zeros((0, 28, 28), numpy.uint8), numpy.zeros((0, 784))):
        labels, probabilities = model.predict(empty), model.predict_proba(empty)
        assert labels.shape == (0,) and labels.dtype == numpy.int64
        assert probabilities.shape == (0, 10) and probabilities.dtype == numpy.float64


@pytest.mark.parametrize(
    "images, message",
    [
        (numpy.full((2, 28, 28), 200.0), r"float images must lie in \[0, 1\]"),
        (numpy.full((2, 28, 28), numpy.nan), r"float images must lie in \[0, 1\]"),
        (numpy.zeros((2, 27, 27), numpy.uint8), r"images must be a batch shaped \(n, 28, 28\)"),
        (numpy.zeros((2, 28, 28), bool), "images must be uint8"),
        (numpy.full((2, 28, 28), 256), "integer images must hold pixels in 0..255"),
        (numpy.full((2, 28, 28), -1), "integer images must hold pixels in 0..255"),
    ],
)
def test_predict_refuses_images_it_would_misread(model_path, images, message):
    model = xpnet.load_model(model_path)
    with pytest.raises(ArgumentError, match=message):
        model.predict(images)


def test_predict_refuses_integer_images_of_only_0_and_1(model_path):
    images = (numpy.arange(2 * 784).reshape(2, 28, 28) % 3 == 0).astype(int)
    with pytest.raises(ArgumentError, match="integer images hold only 0 and 1, where pixels are read as 0..255"):
        xpnet.load_model(model_path).predict(images)
    assert xpnet.load_model(model_path).predict(images * 255).shape == (2,)


def test_predict_memory_stays_flat_in_the_number_of_images(model_path):
    """Four times the images, the same peak but for the answers (10 logits and a label each):
    a float copy of every image would add 94 MB for the 30,000 more."""
    import tracemalloc

    model = xpnet.load_model(model_path, "numpy")
    images = numpy.random.default_rng(0).integers(0, 256, (40_000, 28, 28), dtype=numpy.uint8)
    peaks = []
    for n in (10_000, 40_000):
        tracemalloc.start()
        assert model.predict(images[:n]).shape == (n,)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    answers = 30_000 * (10 * 4 + 8)  # float32 logits and int64 labels of the images added
    assert peaks[1] - peaks[0] < answers + 1e6, f"peaks {peaks[0] / 1e6:.1f} and {peaks[1] / 1e6:.1f} MB"


def test_load_model_takes_a_backend_a_name_or_none(model_path, monkeypatch):
    monkeypatch.delenv("XPNET_BACKEND", raising=False)
    assert xpnet.load_model(model_path).backend.name == "numpy"
    assert xpnet.load_model(model_path, "numba").backend.name == "numba"
    backend = xpnet.get_backend("numba")
    assert xpnet.load_model(model_path, backend).backend is backend


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_a_saved_model_predicts_with_the_activation_it_was_trained_with_on_every_backend(activation, tmp_path):
    data = synthetic_splits(n_train=512)
    trainer = xpnet.Trainer("numpy", data, xpnet.TrainConfig(epochs=1, hidden=(32, 16), activation=activation))
    trainer.fit(log=lambda line: None)
    trainer.model.save(tmp_path / "model.npz")
    images = data.test.images
    expected = trainer.model.predict_proba(images)
    emulated = [EmulatedCupyBackend()] if CXX is not None else []  # CuPy's kernels, run on the CPU
    for backend in (xpnet.get_backend("numpy"), xpnet.get_backend("numba"), *emulated):
        model = xpnet.load_model(tmp_path / "model.npz", backend)
        assert model.activation == activation
        numpy.testing.assert_allclose(model.predict_proba(images), expected, rtol=1e-5, atol=1e-6)
    relu = xpnet.MLP(xpnet.get_backend("numpy"), [784, 32, 16, 10], mean=trainer.model.mean, std=trainer.model.std)
    relu.load_params([p.value for p in trainer.model.parameters()])
    assert numpy.abs(relu.predict_proba(images) - expected).max() > 1e-3  # the activation matters


def test_forward_reuses_its_buffer_and_predict_logits_returns_a_copy():
    """As MLP.forward's docstring says: a step allocates nothing, so a caller keeps logits by copying."""
    model = xpnet.MLP(xpnet.get_backend("numpy"), [784, 16, 10])
    images = synthetic_splits(n_train=8).train.images
    x = model.normalize(images)
    first = model.forward(x[:4])
    kept = first.copy()
    second = model.forward(x[4:])
    assert second is first and not numpy.array_equal(first, kept)
    logits = model.predict_logits(images[:4])
    model.forward(x[4:])
    numpy.testing.assert_allclose(logits, kept, rtol=1e-6)


def test_a_saved_model_predicts_but_cannot_be_resumed(model_path):
    checkpoint = xpnet.load_checkpoint(model_path)
    assert checkpoint.config is None and checkpoint.sizes == [784, 200, 10]
    with pytest.raises(DataError, match="holds a model but no training run"):
        xpnet.Trainer("numpy", synthetic_splits(n_train=64), checkpoint=checkpoint)


CONFIG = xpnet.TrainConfig(epochs=2, batch_size=100, lr=0.05, momentum=0.9, nesterov=True, schedule="cosine")


ADAMW = dataclasses.replace(
    CONFIG, optimizer="adamw", momentum=0.0, nesterov=False, lr=1e-3, weight_decay=0.01, schedule="step", step_size=1
)


GELU = dataclasses.replace(CONFIG, activation="gelu", hidden=(32,))
DROPOUT = dataclasses.replace(CONFIG, dropout=0.3, hidden=(32, 16))
AUGMENT = dataclasses.replace(CONFIG, augment="affine,elastic")


@pytest.mark.parametrize(
    "name, config",
    [("numpy", CONFIG), ("numba", CONFIG), ("numba", ADAMW), ("numba", GELU), ("numba", DROPOUT), ("numba", AUGMENT)],
    ids=["numpy", "numba", "numba-adamw-step", "numba-gelu", "numba-dropout", "numba-augment"],
)
def test_a_run_saved_mid_epoch_resumes_bit_for_bit(name, config, tmp_path):
    data = synthetic_splits(n_train=1000)
    straight = xpnet.Trainer(name, data, config)
    straight.fit(log=lambda line: None)

    first = xpnet.Trainer(name, data, config)
    assert len(first.run_steps(3)) == 3 and (first.epoch, first.epoch_step) == (0, 3)
    first.save(tmp_path / "run.npz")
    resumed = xpnet.Trainer(name, data, xpnet.TrainConfig(epochs=2), xpnet.load_checkpoint(tmp_path / "run.npz"))
    assert (resumed.epoch, resumed.epoch_step) == (0, 3)
    resumed.fit(log=lambda line: None)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        numpy.testing.assert_array_equal(a.value, b.value)
    assert [e.loss for e in resumed.history.epochs] == [e.loss for e in straight.history.epochs]


def test_a_resume_refuses_settings_that_differ_from_the_checkpoints(tmp_path):
    """Only the epochs come from the config: a setting asked for that the checkpoint's run does not
    have is an error, not silently dropped (as `xpnet train --resume` refuses a setting's flag)."""
    data = synthetic_splits(n_train=1000)
    xpnet.Trainer("numpy", data, CONFIG).save(tmp_path / "run.npz")
    checkpoint = xpnet.load_checkpoint(tmp_path / "run.npz")
    clashes = "config sets lr=0.1 (the checkpoint's: 0.05), hidden=(100,) (the checkpoint's: (200,));"
    with pytest.raises(xpnet.ConfigError, match=re.escape(clashes)):
        xpnet.Trainer("numpy", data, xpnet.TrainConfig(epochs=3, hidden=(100,), lr=0.1), checkpoint)
    same = dataclasses.replace(CONFIG, epochs=3)  # the checkpoint's own settings, or the defaults, are fine
    for config in (same, xpnet.TrainConfig(epochs=3)):
        assert xpnet.Trainer("numpy", data, config, checkpoint).config == same


def test_a_state_saved_after_looking_at_the_next_batch_resumes_bit_for_bit(tmp_path):
    """batch(k) draws the epoch's order; the saved state must still be the epoch's start."""
    data = synthetic_splits(n_train=1000)
    straight = xpnet.Trainer("numpy", data, CONFIG)
    straight.fit(log=lambda line: None)
    peeked = xpnet.Trainer("numpy", data, CONFIG)
    peeked.batch(0)
    peeked.save(tmp_path / "run.npz")
    resumed = xpnet.Trainer("numpy", data, CONFIG, xpnet.load_checkpoint(tmp_path / "run.npz"))
    resumed.fit(log=lambda line: None)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        numpy.testing.assert_array_equal(a.value, b.value)


def test_run_steps_stays_within_the_epoch_and_completes_it():
    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=1000), xpnet.TrainConfig(batch_size=300))
    assert trainer.steps_per_epoch == 4
    losses = trainer.run_steps(2)
    assert losses.shape == (2,) and numpy.isfinite(losses).all()
    with pytest.raises(ConfigError, match="run_steps takes 1 to 2 steps"):
        trainer.run_steps(3)
    trainer.run_steps()  # the rest: the epoch is complete and recorded
    assert trainer.epoch == 1 and trainer.epoch_step == 0 and len(trainer.history.epochs) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"hidden": (200, 0)}, "hidden must be one or more layer sizes"),
        ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
        ({"lr": 0.0}, "the learning rate must be a finite number above 0"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"nesterov": True}, "Nesterov momentum needs a momentum above 0"),
        ({"weight_decay": -1e-3}, "weight decay must be a finite number >= 0"),
        ({"schedule": "linear"}, "schedule must be one of 'constant', 'cosine', 'step', 'exponential', got 'linear'"),
        # Types too, from each setting's declaration: a truthy string is no Nesterov flag.
        ({"momentum": 0.9, "nesterov": "no"}, "nesterov must be True or False, got 'no'"),
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"lr": "0.1"}, "lr must be a number, got '0.1'"),
        ({"hidden": (200, 1.5)}, r"hidden must be a tuple of integers, got \(200, 1.5\)"),
    ],
)
def test_train_config_refuses_settings_it_cannot_train_with(settings, message):
    with pytest.raises(ConfigError, match=message):
        xpnet.TrainConfig(**settings)


def test_a_dict_is_taken_as_the_config_and_its_unknown_settings_refused():
    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=64), {"epochs": 1, "hidden": (8,), "batch_size": 32})
    assert trainer.config == xpnet.TrainConfig(epochs=1, hidden=(8,), batch_size=32)
    with pytest.raises(ConfigError, match="unknown settings colour"):
        xpnet.Trainer("numpy", synthetic_splits(n_train=64), {"colour": "red"})
    with pytest.raises(ConfigError, match="config must be a TrainConfig or a dict of its settings, got list"):
        xpnet.Trainer("numpy", synthetic_splits(n_train=64), [1])


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "data must be the splits xpnet.load_dataset\\(\\) returns \\(xpnet.Splits\\), got NoneType"),
        ((numpy.zeros((4, 28, 28), numpy.uint8), numpy.zeros(4, numpy.uint8)), "got tuple"),
        (synthetic_splits(n_train=0), "the train split holds no images: pass data with images in every split"),
    ],
    ids=["none", "a-tuple", "an-empty-training-split"],
)
def test_a_trainer_refuses_data_it_cannot_train_on(data, message):
    with pytest.raises(DataError, match=message):
        xpnet.Trainer("numpy", data)


def test_a_checkpoint_continues_only_on_the_dataset_it_was_trained_on(tmp_path):
    data = synthetic_splits(n_train=64)
    trainer = xpnet.Trainer("numpy", dataclasses.replace(data, name="fashion-mnist"), {"epochs": 1, "hidden": (8,)})
    trainer.fit(log=lambda line: None)
    trainer.save(tmp_path / "fashion.npz")
    with pytest.raises(ConfigError, match="trained on fashion-mnist, not mnist: continue it on xpnet.load_dataset"):
        xpnet.Trainer(
            "numpy", dataclasses.replace(data, name="mnist"), checkpoint=xpnet.load_checkpoint(tmp_path / "fashion.npz")
        )
