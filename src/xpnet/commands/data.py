"""`xpnet data download|verify|info`."""

import sys

from xpnet.data import load_dataset
from xpnet.data.datasets import get_dataset
from xpnet.data.download import check_file, data_location, download_command, prepare_data_dir
from xpnet.data.mnist import find_file


def run(args):
    if args.action == "download":
        print(f"{args.dataset}: all four files verified in {prepare_data_dir(args.data_dir, args.dataset)}")
        return 0
    if args.action == "verify":
        directory, _ = data_location(args.data_dir, args.dataset)
        failures = 0
        for expected in get_dataset(args.dataset).files:
            path = find_file(directory, expected.name)
            reason = "missing" if path is None else check_file(path, expected)
            failures += reason is not None
            print(
                f"{'ok  ' if reason is None else 'FAIL'} {path or directory / expected.name}"
                + (f": {reason}" if reason else "")
            )
        if failures:
            print(
                f"xpnet data verify: {failures} of 4 files in {directory} are not {args.dataset}; "
                f"run `{download_command(args.dataset)}` to fetch them",
                file=sys.stderr,
            )
            return 1
        print(f"{directory} holds the verified {args.dataset} files")
        return 0
    splits = load_dataset(args.dataset, args.data_dir, download=False)
    for split_name in ("train", "validation", "test"):
        split = getattr(splits, split_name)
        print(
            f"{split_name:<10} {len(split):>6} images of {'x'.join(map(str, split.images.shape[1:]))}, "
            f"labels {split.labels.min()}-{split.labels.max()}"
        )
    for name in get_dataset(args.dataset).files:
        print(f"file       {find_file(splits.directory, name.name)}")
    return 0
