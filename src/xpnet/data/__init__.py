"""Datasets: the IDX format, where the files live, verified downloads, the seed recipe's splits."""

from xpnet.data.datasets import get_dataset
from xpnet.data.download import prepare_data_dir
from xpnet.data.mnist import Split, Splits, load_splits
from xpnet.errors import DataError


def load_dataset(name="mnist", data_dir=None, download=True):
    """The training (first 50,000), validation (last 10,000) and test splits of a dataset.

    Each split has ``.images`` (uint8, n x 28 x 28) and ``.labels`` (uint8). The files are read
    from data_dir, else $XPNET_DATA_DIR, else the per-user cache, which is filled from the
    dataset's mirrors when download is true (each file checked against its SHA-256).
    """
    splits = load_splits(prepare_data_dir(data_dir, name, download=download))
    classes = get_dataset(name).classes
    for split in (splits.train, splits.validation, splits.test):
        if len(split) and split.labels.max() >= classes:
            raise DataError(
                f"{splits.directory} holds label {split.labels.max()}, but {name}'s labels are 0 to {classes - 1}; "
                "the label file is corrupt or of another dataset"
            )
    splits.name = name
    return splits


__all__ = ["Split", "Splits", "load_dataset"]
