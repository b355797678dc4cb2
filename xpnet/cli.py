"""The command line: `xpnet train ...`. Every user error is one line on stderr and exit 2."""

import argparse
import math
import sys
import time

from xpnet.backends import REGISTRY, get_backend
from xpnet.errors import XpnetError


class UsageError(XpnetError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage dump) and exit 2 like every user error."""

    def error(self, message):
        raise UsageError(message)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def int_list(text):
    """'512,256,128' -> (512, 256, 128), each at least 1."""
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}; write sizes like 200 or 512,256") from None


def name_list(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected backend names like numpy,numba, got {text!r}")
    return names


def add_backend_flags(parser):
    parser.add_argument(
        "--backend", default=None,
        help=f"array backend: {', '.join(REGISTRY)} (default: $XPNET_BACKEND, else numpy)",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_data_flags(parser)


def add_data_flags(parser):
    from xpnet.data.datasets import DATASETS

    parser.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files (default: $XPNET_DATA_DIR, else the per-user cache)")


def build_parser():
    from xpnet.nn.train import TrainConfig

    defaults = TrainConfig()
    parser = _Parser(prog="xpnet", description="A from-scratch MLP for MNIST on NumPy, Numba or CuPy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train an MLP and report validation and test accuracy")
    add_backend_flags(train)
    train.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    train.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    train.add_argument("--lr", type=positive_float, default=defaults.lr,
                       help=f"learning rate on the mean loss (default {defaults.lr:g}: the seed's 1e-4 on the summed loss of 512)")
    train.add_argument("--hidden", type=int_list, default=defaults.hidden,
                       help="hidden layer sizes, e.g. 200 or 512,256,128,64 (default 200)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.set_defaults(run=run_train)

    verify = commands.add_parser("verify", help="check the backends against NumPy float64, op by op and step by step")
    verify.add_argument("--backends", type=name_list, default=None, help="comma-separated (default: every available backend)")
    verify.add_argument("--steps", type=positive_int, default=5)
    verify.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_data_flags(verify)
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(run=run_verify)

    bench = commands.add_parser("bench", help="training throughput of each backend, against the matmul floor and PyTorch")
    bench.add_argument("--backends", type=name_list, default=None, help="comma-separated (default: every available backend)")
    bench.add_argument("--batch-sizes", type=int_list, default=None, help="e.g. 128,512 (default 1,64,128,512,2048; --quick 128,512)")
    bench.add_argument("--hidden", type=int_list, nargs="+", default=None, help="one or more architectures, e.g. --hidden 200 800 2048")
    bench.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    bench.add_argument("--repeats", type=positive_int, default=None, help="timed epochs per row (default 3; --quick 1)")
    bench.add_argument("--quick", action="store_true", help="batch 128 and 512, one timed epoch: under a minute")
    bench.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows even when torch is installed")
    bench.add_argument("--json", default=None, help="write the results as JSON (schema in bench/README.md)")
    bench.add_argument("--markdown", default=None, help="write the table as Markdown")
    bench.set_defaults(run=run_bench)

    data = commands.add_parser("data", help="download, verify or describe a dataset")
    data.add_argument("action", choices=["download", "verify", "info"])
    add_data_flags(data)
    data.set_defaults(run=run_data)
    return parser


def run_train(args):
    from xpnet.data.download import prepare_data_dir
    from xpnet.data.mnist import load_splits
    from xpnet.nn.train import TrainConfig, Trainer

    backend = get_backend(args.backend)
    data_dir = prepare_data_dir(args.data_dir, args.dataset)
    splits = load_splits(data_dir)
    config = TrainConfig(args.epochs, args.batch_size, args.lr, args.hidden, args.seed, args.dtype)
    compile_seconds = backend.prepare(config.dtype)
    if compile_seconds:
        print(f"{backend.name}: compiled kernels in {compile_seconds:.2f} s (not counted in epoch times)")
    trainer = Trainer(backend, splits, config)
    sizes = "-".join(map(str, trainer.model.sizes))
    print(f"Training {sizes} on {backend.name} ({config.dtype}), data from {data_dir}")
    start = time.perf_counter()
    trainer.fit()
    print(f"Total training time: {time.perf_counter() - start:.1f} s")
    return 0


def run_verify(args):
    import numpy
    from rich.console import Console
    from rich.table import Table

    from xpnet.backends import available_backends
    from xpnet.data.download import prepare_data_dir
    from xpnet.data.mnist import load_splits
    from xpnet.verify import summarize, verify

    candidates = [get_backend(name) for name in (args.backends or available_backends())]
    splits = load_splits(prepare_data_dir(args.data_dir, args.dataset))
    pixels = splits.train.images.reshape(len(splits.train), -1).astype(numpy.float64)
    images = (pixels - pixels.mean()) / pixels.std()
    for backend in candidates:
        backend.prepare(args.dtype)
    checks = verify(candidates, images, splits.train.labels, steps=args.steps, dtype=args.dtype, seed=args.seed)
    table = Table(title=f"{args.dtype} against NumPy float64, worst over {args.steps} steps (error/bound <= 1 passes)")
    for column in ("op", "backend", "max abs err", "max rel err", "tolerance", "error/bound", "result"):
        table.add_column(column, justify="left" if column in ("op", "backend") else "right")
    for check in summarize(checks):
        table.add_row(check.op, check.backend, f"{check.max_abs:.2e}", f"{check.max_rel:.2e}", f"{check.tolerance:.2e}",
                      f"{check.bound_used:.3f}", "pass" if check.passed else "[bold red]FAIL")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a log or pipe: wide enough that rows stay on one line
    console.print(table)
    failed = [check for check in checks if not check.passed]
    if failed:
        first = failed[0]
        print(f"xpnet verify: {first.backend} disagrees first at step {first.step}, {first.op}: "
              f"error {first.max_abs:.3g} is {first.bound_used:.3g}x its bound", file=sys.stderr)
        return 1
    print(f"All {len(checks)} checks agree: {', '.join(b.name for b in candidates)} ({args.dtype}, {args.steps} steps).")
    return 0


def run_data(args):
    from xpnet.data.datasets import get_dataset
    from xpnet.data.download import check_file, prepare_data_dir
    from xpnet.data.mnist import find_file, load_splits, resolve_data_dir

    if args.action == "download":
        print(f"{args.dataset}: all four files verified in {prepare_data_dir(args.data_dir, args.dataset)}")
        return 0
    if args.action == "verify":
        directory = resolve_data_dir(args.data_dir, args.dataset)
        failures = 0
        for expected in get_dataset(args.dataset).files:
            path = find_file(directory, expected.name)
            reason = "missing" if path is None else check_file(path, expected)
            failures += reason is not None
            print(f"{'ok  ' if reason is None else 'FAIL'} {path or directory / expected.name}" + (f": {reason}" if reason else ""))
        if failures:
            print(f"xpnet data verify: {failures} of 4 files in {directory} are not {args.dataset}; run `xpnet data download` to fetch them", file=sys.stderr)
            return 1
        print(f"{directory} holds the verified {args.dataset} files")
        return 0
    directory = prepare_data_dir(args.data_dir, args.dataset, download=False)
    splits = load_splits(directory)
    for split_name in ("train", "validation", "test"):
        split = getattr(splits, split_name)
        print(f"{split_name:<10} {len(split):>6} images of {'x'.join(map(str, split.images.shape[1:]))}, "
              f"labels {split.labels.min()}-{split.labels.max()}")
    for name in get_dataset(args.dataset).files:
        print(f"file       {find_file(directory, name.name)}")
    return 0


def run_bench(args):
    from xpnet.backends import available_backends
    from xpnet.bench_report import run_report

    backends = [get_backend(name) for name in (args.backends or available_backends())]
    batch_sizes = args.batch_sizes or ((128, 512) if args.quick else (1, 64, 128, 512, 2048))
    repeats = args.repeats or (1 if args.quick else 3)
    return run_report(backends, batch_sizes, args.hidden or [(200,)], args.dtype, repeats,
                      with_torch=not args.no_torch, json_path=args.json, markdown_path=args.markdown,
                      agreement_steps=3 if args.quick else 10)


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except XpnetError as exc:
        print(f"xpnet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xpnet: interrupted", file=sys.stderr)
        return 130
