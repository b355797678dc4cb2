"""Checkpoints: exact resume, portability across backends, and bad files."""

import re
import subprocess
import sys

import numpy
import pytest

from xpnet.backends import get_backend
from xpnet.data.mnist import Split, Splits
from xpnet.data.synthetic import synthetic_splits
from xpnet.errors import DataError
from xpnet.nn.checkpoint import load_checkpoint
from xpnet.nn.train import TrainConfig, Trainer, TrainingInterrupted

CONFIG = TrainConfig(
    epochs=3, batch_size=256, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine"
)


@pytest.fixture(scope="module")
def small_splits(mnist_splits):
    """A fifth of the training set: the same code paths, five times faster."""
    return Splits(
        Split(mnist_splits.train.images[:10_000], mnist_splits.train.labels[:10_000]),
        mnist_splits.validation,
        mnist_splits.test,
    )


def quiet(line):
    pass


class InterruptInEpoch:
    """Wraps a trainer's run_steps: in the given epoch it takes 7 steps, then raises
    KeyboardInterrupt as Ctrl-C would, the weights already moved (compiled or not)."""

    def __init__(self, trainer, epoch):
        self.trainer, self.epoch, self.run_steps = trainer, epoch, trainer.run_steps
        trainer.run_steps = self

    def __call__(self, n=None, progress=None):
        if self.trainer.epoch + 1 == self.epoch:
            self.run_steps(7)
            raise KeyboardInterrupt
        return self.run_steps(n, progress)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_interrupted_and_resumed_run_ends_bit_for_bit_like_an_uninterrupted_one(small_splits, tmp_path, name):
    straight = Trainer(get_backend(name), small_splits, CONFIG)
    straight.fit(log=quiet)

    interrupted = Trainer(get_backend(name), small_splits, CONFIG)
    InterruptInEpoch(interrupted, epoch=2)
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit(log=quiet)
    assert info.value.checkpoint.epoch == 1
    info.value.checkpoint.save(tmp_path / "run.npz")

    resumed = Trainer(get_backend(name), small_splits, TrainConfig(epochs=3), load_checkpoint(tmp_path / "run.npz"))
    assert resumed.epoch == 1 and resumed.config == CONFIG
    resumed.fit(log=quiet)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        numpy.testing.assert_array_equal(a.value, b.value)
    assert [e.loss for e in resumed.history.epochs] == [e.loss for e in straight.history.epochs]


def test_restore_on_a_trainer_that_went_on_replays_from_the_saved_state():
    """The trainer draws each epoch's order ahead, during the epoch before: restoring an older
    state must drop what was drawn for the epoch after the current one."""
    trainer = Trainer(get_backend("numpy"), synthetic_splits(n_train=2048), TrainConfig(batch_size=256))
    trainer.train_epoch()
    saved = trainer.state()
    second_epoch = trainer.run_steps()
    trainer.restore(saved)
    numpy.testing.assert_array_equal(trainer.run_steps(), second_epoch)


def run_xpnet(*args):
    return subprocess.run([sys.executable, "-m", "xpnet", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint_on_numpy(mnist_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "numpy.npz"
    result = run_xpnet(
        "train", "--backend", "numpy", "--epochs", "2", "--save", str(path), "--data-dir", str(mnist_dir)
    )
    assert result.returncode == 0, result.stderr
    return path


def test_a_numpy_checkpoint_evaluates_identically_on_numba(checkpoint_on_numpy, mnist_dir, tmp_path):
    outputs = {}
    for name in ("numpy", "numba"):
        result = run_xpnet(
            "evaluate", "--checkpoint", str(checkpoint_on_numpy), "--backend", name, "--data-dir", str(mnist_dir)
        )
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout.replace(f"({name})", "")
    assert outputs["numpy"] == outputs["numba"]
    assert "Test accuracy: 0.9" in outputs["numpy"] and "Confusion matrix" in outputs["numpy"]


def test_cli_save_then_resume_equals_one_longer_run(small_data_dir, tmp_path):
    resumed, straight = tmp_path / "resumed.npz", tmp_path / "straight.npz"
    data = ("--data-dir", str(small_data_dir), "--threads", "1")  # fixed: auto could steer the runs apart
    assert run_xpnet("train", "--epochs", "2", "--batch-size", "256", "--save", str(resumed), *data).returncode == 0
    result = run_xpnet("train", "--resume", str(resumed), "--epochs", "3", "--save", str(resumed), *data)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "Epoch 3 - Cost" in result.stdout and "Epoch 2 - Cost" not in result.stdout
    assert run_xpnet("train", "--epochs", "3", "--batch-size", "256", "--save", str(straight), *data).returncode == 0
    for a, b in zip(load_checkpoint(resumed).params, load_checkpoint(straight).params):
        numpy.testing.assert_array_equal(a, b)


def test_checkpoint_holds_what_it_promises(checkpoint_on_numpy, mnist_splits):
    checkpoint = load_checkpoint(checkpoint_on_numpy)
    assert checkpoint.sizes == [784, 200, 10] and checkpoint.dtype == checkpoint.config["dtype"] == "float32"
    assert checkpoint.epoch == 2 and len(checkpoint.history) == 2
    assert checkpoint.mean == pytest.approx(mnist_splits.train.images.mean())
    assert [p.shape for p in checkpoint.params] == [(200, 784), (200,), (10, 200), (10,)]


def one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_bad_checkpoints_are_one_line_errors(checkpoint_on_numpy, tmp_path, mnist_dir):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(checkpoint_on_numpy.read_bytes()[:5000])
    one_line_error(
        run_xpnet("evaluate", "--checkpoint", str(truncated), "--data-dir", str(mnist_dir)), "not a readable checkpoint"
    )
    one_line_error(run_xpnet("evaluate", "--checkpoint", str(tmp_path / "missing.npz")), "checkpoint not found")
    mismatched = tmp_path / "mismatched.npz"
    checkpoint = load_checkpoint(checkpoint_on_numpy)
    checkpoint.sizes = [784, 100, 10]
    checkpoint.save(mismatched)
    one_line_error(
        run_xpnet("evaluate", "--checkpoint", str(mismatched)),
        "param.0 has shape (200, 784) but the architecture 784-100-10",
    )
    one_line_error(run_xpnet("train", "--resume", str(tmp_path / "missing.npz")), "checkpoint not found")
    with pytest.raises(DataError, match="not a usable xpnet checkpoint: format .other."):
        numpy.savez(tmp_path / "other.npz", metadata=numpy.frombuffer(b'{"format": "other"}', numpy.uint8))
        load_checkpoint(tmp_path / "other.npz")


def test_divergence_names_epoch_and_step_and_keeps_the_last_good_checkpoint(
    checkpoint_on_numpy, tmp_path, small_data_dir
):
    kept = tmp_path / "kept.npz"
    kept.write_bytes(checkpoint_on_numpy.read_bytes())
    result = run_xpnet(
        "train",
        "--lr",
        "1e30",
        "--epochs",
        "2",
        "--save",
        str(kept),
        "--save-every",
        "1",
        "--data-dir",
        str(small_data_dir),
    )
    one_line_error(result, "training diverged in epoch 1 at step ")
    assert re.search(r"at step \d of 4 \(loss (nan|inf)\)", result.stderr), result.stderr
    assert "try a smaller --lr" in result.stderr and "the last good checkpoint" in result.stderr
    assert kept.read_bytes() == checkpoint_on_numpy.read_bytes()


def test_train_plot_and_no_progress_bar_off_a_terminal(small_data_dir, tmp_path):
    from PIL import Image

    plot = tmp_path / "curves.png"
    result = run_xpnet("train", "--epochs", "2", "--plot", str(plot), "--data-dir", str(small_data_dir))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr and "batch/s" not in result.stderr  # no tqdm bar in a pipe
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 400


@pytest.mark.parametrize("suffix, start", [("png", b"\x89PNG"), ("SVG", b"<?xml"), ("pdf", b"%PDF")])
def test_a_plot_is_written_in_the_format_its_name_says(tmp_path, suffix, start):
    from xpnet.plots import pyplot, save_figure

    path = tmp_path / f"figure.{suffix}"
    save_figure(pyplot().figure(), path)
    assert path.read_bytes().startswith(start)


def test_evaluate_plot_writes_a_confusion_matrix_png(checkpoint_on_numpy, mnist_dir, tmp_path):
    from PIL import Image

    plot = tmp_path / "confusion.png"
    assert (
        run_xpnet(
            "evaluate", "--checkpoint", str(checkpoint_on_numpy), "--plot", str(plot), "--data-dir", str(mnist_dir)
        ).returncode
        == 0
    )
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_ctrl_c_between_epochs_still_saves_the_last_whole_one():
    """Ctrl-C while an epoch's line is being logged (outside any step) is a TrainingInterrupted
    like one inside a step, never a bare KeyboardInterrupt that loses the run."""
    from xpnet.data.synthetic import synthetic_splits

    def log(line):
        if line.startswith("Epoch 2"):
            raise KeyboardInterrupt

    trainer = Trainer(get_backend("numpy"), synthetic_splits(n_train=512), TrainConfig(epochs=5, batch_size=128))
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(log=log)
    assert info.value.checkpoint.epoch == 2 and info.value.checkpoint.epoch_step == 0


def interrupt_wrapped_by_c_code():
    """What a KeyboardInterrupt raised inside a Python callback of C code comes back as: seen
    with Numba unpickling a constant when Ctrl-C landed there."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        raise SystemError("<function _numba_unpickle> returned a result with an exception set") from interrupt


@pytest.mark.parametrize("wrapped", [True, False], ids=["an-interrupt-inside-c-code", "any-other-error"])
def test_an_interrupt_wrapped_by_a_library_still_saves_the_last_whole_epoch(wrapped):
    from xpnet.data.synthetic import synthetic_splits

    def log(line):
        if line.startswith("Epoch 2"):
            if wrapped:
                interrupt_wrapped_by_c_code()
            raise SystemError("a library's own fault")

    trainer = Trainer(get_backend("numpy"), synthetic_splits(n_train=512), TrainConfig(epochs=5, batch_size=128))
    with pytest.raises(TrainingInterrupted if wrapped else SystemError) as info:
        trainer.fit(log=log)
    assert not wrapped or info.value.checkpoint.epoch == 2


def save_in_format_1(checkpoint, path):
    """A checkpoint laid out as xpnet wrote it before format 2 (xpnet-checkpoint/1): sizes, dtype,
    mean and std at the top of the metadata, the run's settings as they were then, SGD's step
    count as optimizer_steps and its velocities as velocity.N arrays."""
    import json

    old_settings = ("epochs", "batch_size", "lr", "hidden", "seed", "dtype", "momentum", "nesterov")
    old_settings += ("weight_decay", "schedule")
    config = None if checkpoint.config is None else {name: checkpoint.config[name] for name in old_settings}
    metadata = {
        "format": "xpnet-checkpoint/1",
        **{key: getattr(checkpoint, key) for key in ("sizes", "dtype", "mean", "std")},
        "config": config,
        **{key: getattr(checkpoint, key) for key in ("epoch", "epoch_step", "epoch_losses", "optimizer_steps")},
        **{key: getattr(checkpoint, key) for key in ("rng_state", "history", "dataset")},
    }
    arrays = {f"param.{i}": a for i, a in enumerate(checkpoint.params)}
    arrays.update({f"velocity.{i}": v for i, v in enumerate(checkpoint.optimizer_state.get("velocity", []))})
    arrays["metadata"] = numpy.frombuffer(json.dumps(metadata).encode(), dtype=numpy.uint8)
    numpy.savez(path, **arrays)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_a_checkpoint_in_the_format_before_loads_predicts_and_resumes_bit_for_bit(tmp_path, name):
    """A run saved mid-epoch in format 1 (by the code before settings were declared once): it
    loads as SGD with ReLU, its model predicts as the run's did, and it resumes to the bits of
    the uninterrupted run."""
    from xpnet.nn.model import MLP, load_model

    data = synthetic_splits(n_train=1000)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, momentum=0.9, nesterov=True, schedule="cosine")
    straight = Trainer(get_backend(name), data, config)
    straight.fit(log=quiet)
    first = Trainer(get_backend(name), data, config)
    first.run_steps()
    first.run_steps(5)
    save_in_format_1(first.state(), tmp_path / "old.npz")
    old = load_checkpoint(tmp_path / "old.npz")
    assert (old.optimizer, old.activation, old.epoch, old.epoch_step) == ("sgd", "relu", 1, 5)
    assert sorted(old.optimizer_state) == ["velocity"] and old.train_config() == config
    images = data.test.images
    expected = MLP.from_checkpoint(first.state(), name).predict_logits(images)
    numpy.testing.assert_array_equal(load_model(tmp_path / "old.npz", name).predict_logits(images), expected)
    resumed = Trainer(get_backend(name), data, TrainConfig(epochs=2), old)
    resumed.fit(log=quiet)
    for got, want in zip(resumed.model.parameters(), straight.model.parameters()):
        numpy.testing.assert_array_equal(resumed.backend.to_numpy(got.value), straight.backend.to_numpy(want.value))
    assert [e.loss for e in resumed.history.epochs] == [e.loss for e in straight.history.epochs]


def test_a_model_saved_on_its_own_in_the_format_before_predicts(tmp_path):
    from xpnet.nn.checkpoint import Checkpoint
    from xpnet.nn.model import MLP, load_model

    model = MLP(get_backend("numpy"), [784, 16, 10], seed=3, mean=33.3, std=78.6)
    params = [p.value.copy() for p in model.parameters()]
    save_in_format_1(Checkpoint(params=params, **model.architecture()), tmp_path / "model.npz")
    images = synthetic_splits(n_train=10).test.images
    numpy.testing.assert_array_equal(
        load_model(tmp_path / "model.npz").predict_logits(images), model.predict_logits(images)
    )
    with pytest.raises(DataError, match="holds a model but no training run"):
        load_checkpoint(tmp_path / "model.npz").train_config()


def test_a_checkpoint_without_a_setting_added_since_takes_its_default(tmp_path):
    """Every setting of today was in format 1, so a later one is stood for by deleting one from
    the file: it loads, and the run resumes with the declared default."""
    import json

    trainer = Trainer(get_backend("numpy"), synthetic_splits(n_train=256), TrainConfig(epochs=2, batch_size=64))
    trainer.run_steps(2)
    trainer.save(tmp_path / "run.npz")
    with numpy.load(tmp_path / "run.npz") as archive:
        arrays = {key: archive[key] for key in archive.files}
    metadata = json.loads(arrays["metadata"].tobytes())
    del metadata["config"]["schedule"]
    arrays["metadata"] = numpy.frombuffer(json.dumps(metadata).encode(), dtype=numpy.uint8)
    numpy.savez(tmp_path / "older.npz", **arrays)
    checkpoint = load_checkpoint(tmp_path / "older.npz")
    assert "schedule" not in checkpoint.config and checkpoint.train_config().schedule == "constant"
    resumed = Trainer(get_backend("numpy"), synthetic_splits(n_train=256), TrainConfig(epochs=2), checkpoint)
    assert resumed.epoch_step == 2 and numpy.isfinite(resumed.run_steps()).all()
