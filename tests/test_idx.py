import gzip

import numpy
import pytest

from xpnet.data.idx import IMAGES_MAGIC, LABELS_MAGIC, encode_idx, read_idx, write_idx
from xpnet.data.mnist import load_splits
from xpnet.errors import DataError


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_generated_file_round_trips(tmp_path, suffix):
    images = numpy.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=numpy.uint8)
    labels = numpy.arange(5, dtype=numpy.uint8)
    write_idx(tmp_path / f"images{suffix}", images)
    write_idx(tmp_path / f"labels{suffix}", labels)
    numpy.testing.assert_array_equal(read_idx(tmp_path / f"images{suffix}", IMAGES_MAGIC), images)
    numpy.testing.assert_array_equal(read_idx(tmp_path / f"labels{suffix}", LABELS_MAGIC), labels)


def write_bytes(path, content, compress=True):
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)
    return path


IMAGES = encode_idx(numpy.zeros((3, 4, 4), numpy.uint8))
BAD_FILES = {
    "wrong magic": (lambda p: write_bytes(p, encode_idx(numpy.zeros(3, numpy.uint8))), "wrong magic number"),
    "truncated payload": (lambda p: write_bytes(p, IMAGES[:-5]), "truncated"),
    "not gzip": (lambda p: write_bytes(p, IMAGES, compress=False), "not a valid gzip file"),
    "truncated gzip": (lambda p: write_bytes(p, gzip.compress(IMAGES)[:-20], compress=False), "not a valid gzip file"),
    "empty file": (lambda p: write_bytes(p, b"", compress=False), "the file is empty"),
    "empty content": (lambda p: write_bytes(p, b""), "too short for an IDX header"),
}


@pytest.mark.parametrize("fault", list(BAD_FILES))
def test_bad_file_raises_data_error_naming_file_and_fault(tmp_path, fault):
    make, message = BAD_FILES[fault]
    path = make(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=message) as info:
        read_idx(path, IMAGES_MAGIC)
    assert str(path) in str(info.value)


def make_dataset(directory, n_train, n_test, n_labels=None):
    rng = numpy.random.default_rng(0)
    write_idx(directory / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28), dtype=numpy.uint8))
    write_idx(directory / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_labels or n_train, dtype=numpy.uint8))
    write_idx(directory / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=numpy.uint8))
    write_idx(directory / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test, dtype=numpy.uint8))


def test_image_label_count_mismatch(tmp_path):
    make_dataset(tmp_path, n_train=12, n_test=4, n_labels=11)
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_splits(tmp_path, validation_size=2)


def test_split_keeps_the_last_images_for_validation(tmp_path):
    make_dataset(tmp_path, n_train=12, n_test=4)
    splits = load_splits(tmp_path, validation_size=2)
    all_images = read_idx(tmp_path / "train-images-idx3-ubyte.gz", IMAGES_MAGIC)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (10, 2, 4)
    numpy.testing.assert_array_equal(splits.validation.images, all_images[10:])


def test_missing_files_are_named(tmp_path):
    make_dataset(tmp_path, n_train=12, n_test=4)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=f"{tmp_path} lacks t10k-labels-idx1-ubyte"):
        load_splits(tmp_path)
