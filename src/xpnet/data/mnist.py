"""Where the dataset lives, and its split into training, validation and test sets.

The data directory is, in order: the --data-dir argument, $XPNET_DATA_DIR, or the per-user
cache ($XDG_CACHE_HOME/xpnet/<dataset>, else ~/.cache/xpnet/<dataset>). Any directory that
holds the four standard IDX files, gzip-compressed or not, works. Filling a directory that
lacks them is xpnet.data.download's job.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy

from xpnet.data.datasets import FILE_NAMES
from xpnet.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from xpnet.errors import DataError

ENV_VAR = "XPNET_DATA_DIR"
VALIDATION_SIZE = 10_000  # the last 10,000 training images, as in the seed recipe


def user_cache_dir(dataset="mnist"):
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xpnet" / dataset


def resolve_data_dir(data_dir=None, dataset="mnist"):
    """(directory, named): the directory to read (and download into) by the precedence above,
    and whether the user named it (flag or environment) rather than it being the cache."""
    named = data_dir or os.environ.get(ENV_VAR)
    return Path(named or user_cache_dir(dataset)).expanduser(), bool(named)


def find_file(data_dir, name):
    """The path of name.gz or name in data_dir, or None."""
    for candidate in (Path(data_dir) / f"{name}.gz", Path(data_dir) / name):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir):
    return [name for name in FILE_NAMES if find_file(data_dir, name) is None]


def require_files(data_dir):
    """Fail with one line naming the directory and what it lacks."""
    data_dir = Path(data_dir)
    try:
        if data_dir.exists() and not data_dir.is_dir():
            raise DataError(
                f"{data_dir} is a file, not a directory; pass --data-dir the directory holding the IDX files"
            )
        if not data_dir.is_dir():
            raise DataError(
                f"data directory {data_dir} does not exist; pass --data-dir or set {ENV_VAR} "
                "to a directory holding the four MNIST IDX files"
            )
        missing = missing_files(data_dir)
    except OSError as exc:
        raise DataError(f"cannot read the data directory {data_dir} ({exc.strerror}); check its permissions") from None
    if missing:
        raise DataError(
            f"{data_dir} lacks {', '.join(missing)} (.gz or raw); "
            f"pass --data-dir or set {ENV_VAR} to a directory holding them"
        )


@dataclass
class Split:
    """Images (n x 28 x 28 uint8) and their labels (n uint8)."""

    images: numpy.ndarray  # (n, 28, 28) uint8
    labels: numpy.ndarray  # (n,) uint8

    def __len__(self):
        return len(self.labels)


@dataclass
class Splits:
    """The training, validation and test splits of a dataset."""

    train: Split
    validation: Split
    test: Split
    directory: Path = None  # where the files were read from; None for data made in memory
    name: str = None  # the dataset's name, when it is a known one


def read_pair(images_path, labels_path):
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the pair does not match"
        )
    return Split(images, labels)


def load_splits(data_dir, validation_size=VALIDATION_SIZE):
    """Training (all but the last validation_size), validation (the rest) and test (t10k)."""
    require_files(data_dir)
    train_images, train_labels, test_images, test_labels = (find_file(data_dir, name) for name in FILE_NAMES)
    train = read_pair(train_images, train_labels)
    test = read_pair(test_images, test_labels)
    for split, path in ((train, train_images), (test, test_images)):
        if len(split) == 0 or split.images.ndim != 3 or 0 in split.images.shape:
            raise DataError(f"{path} holds no images (dimensions {'x'.join(map(str, split.images.shape))})")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"training images are {train.images.shape[1:]} but test images are "
            f"{test.images.shape[1:]}; {data_dir} mixes two datasets"
        )
    if len(train) <= validation_size:
        raise DataError(
            f"{train_images} has {len(train)} images; at least {validation_size + 1} "
            "are needed to hold out the validation set"
        )
    cut = len(train) - validation_size
    return Splits(
        train=Split(train.images[:cut], train.labels[:cut]),
        validation=Split(train.images[cut:], train.labels[cut:]),
        test=test,
        directory=Path(data_dir),
    )
