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


def add_backend_flags(parser):
    parser.add_argument(
        "--backend", default=None,
        help=f"array backend: {', '.join(REGISTRY)} (default: $XPNET_BACKEND, else numpy)",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
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
    return parser


def run_train(args):
    from xpnet.data.mnist import load_splits, resolve_data_dir
    from xpnet.nn.train import TrainConfig, Trainer

    backend = get_backend(args.backend)
    data_dir = resolve_data_dir(args.data_dir)
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
