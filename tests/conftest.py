import collections
import os

import pytest

from xpnet.data.datasets import FILE_NAMES
from xpnet.data.idx import write_idx
from xpnet.data.mnist import VALIDATION_SIZE, missing_files, resolve_data_dir
from xpnet.data.synthetic import synthetic_splits


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST files, found through the project's data-dir setting ($XPNET_DATA_DIR).

    Skipped where they are absent, except in CI, where their absence is a set-up failure.
    """
    data_dir, _ = resolve_data_dir()
    if not data_dir.is_dir() or missing_files(data_dir):
        message = f"real MNIST files not found in {data_dir}; set XPNET_DATA_DIR to ../shared/mnist"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return data_dir


@pytest.fixture(scope="session")
def mnist_splits(mnist_dir):
    from xpnet.data.mnist import load_splits

    return load_splits(mnist_dir)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A generated dataset in IDX files, the smallest the seed's split accepts (2,048 training
    images beside the 10,000 of validation): for CLI tests of behaviour, not accuracy."""
    directory = tmp_path_factory.mktemp("small-dataset")
    splits = synthetic_splits(n_train=2_048 + VALIDATION_SIZE, n_test=100, seed=1)
    arrays = (splits.train.images, splits.train.labels, splits.test.images, splits.test.labels)
    for name, array in zip(FILE_NAMES, arrays):
        write_idx(directory / f"{name}.gz", array)
    return directory


@pytest.fixture(scope="session")
def seed_recipe_history(mnist_splits):
    """The seed recipe's 20-epoch run on a backend, trained once per backend and session."""
    from xpnet.nn.train import TrainConfig, Trainer

    histories = {}

    def history(backend):
        if backend.name not in histories:
            trainer = Trainer(backend, mnist_splits, TrainConfig())
            histories[backend.name] = trainer.fit(log=lambda line: None)
        return histories[backend.name]

    return history


def pytest_terminal_summary(terminalreporter):
    """The skips once per reason, with their count: pytest's -rs repeats a reason per test line
    (the CuPy advice 30 times on a machine without a GPU)."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
            reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped, by reason", sep="-")
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:4d} skipped: {reason}")
