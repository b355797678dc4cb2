"""The command line: the parser and main(). Each subcommand's work is in src/xpnet/commands/.
Every user error is one line on stderr and exit 2."""

import argparse
import dataclasses
import errno
import importlib
import os
import sys

from xpnet.backends import REGISTRY
from xpnet.bench import BENCH_ACTIVATIONS, BENCH_OPTIMIZERS
from xpnet.bench_peers import PEERS
from xpnet.errors import UsageError, XpnetError, is_interrupt


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it states its own or has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            default = action.default
            shown = (
                ",".join(map(str, default))
                if isinstance(default, tuple)
                else f"{default:g}"
                if isinstance(default, float)
                else default
            )
            text += f" (default: {shown})".replace("%", "%%")
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage dump) and exit 2 like every user error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):
        raise UsageError(message)

    def _print_message(self, message, file=None):
        # argparse's own ignores a failed write (help sent to a full disk), and exits 0 as if it was read.
        if message:
            (file or sys.stderr).write(message)


def integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def number(text):
    """A float; whether it is a usable value is TrainConfig's to say, in one place."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def comma_list(parse_item, advice):
    """A flag's type for comma-separated items, each parsed by parse_item: '512,256' -> (512, 256)."""

    def parse(text):
        try:
            return tuple(parse_item(part) for part in text.split(","))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}; {advice}") from None

    return parse


int_list = comma_list(positive_int, "write sizes like 200 or 512,256")  # each at least 1
number_list = comma_list(number, "write numbers like 0.9,0.999")


def thread_count(text):
    """--threads: 'auto' or a count from 1 to the cores this process may use."""
    from xpnet.threads import check_threads

    try:
        return check_threads(text)
    except XpnetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_threads_flag(parser):
    parser.add_argument(
        "--threads",
        type=thread_count,
        default="auto",
        help="threads for the products (BLAS's, or numba's compiled loop's own from 128 rows): auto takes the "
        "cores other processes leave, measured as each epoch runs (alone: every core); a count (at most the "
        "cores) fixes it, and with it the last bits of every result, which OpenBLAS rounds differently at "
        "different counts",
    )


def comma_list(text):
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def name_list(text):
    names = comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected backend names like numpy,numba, got {text!r}")
    return names


def peer_list(text):
    """--peers: some of PEERS, comma-separated."""
    names = comma_list(text)
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown peer {', '.join(unknown) or repr(text)}: choose from {','.join(PEERS)}, or --no-peers for none"
        )
    return tuple(names)


def add_backend_flag(parser):
    parser.add_argument(
        "--backend", default=None, help=f"array backend: {', '.join(REGISTRY)} (default: $XPNET_BACKEND, else numpy)"
    )


def add_dtype_flag(parser):
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="floating-point type")


def add_plot_flag(parser, what):
    parser.add_argument("--plot", default=None, help=f"write {what} as a .png, .svg or .pdf (needs matplotlib)")


def add_data_flags(parser, default="mnist", help="(default: mnist)"):
    """--dataset and --data-dir; commands that read a checkpoint default to its dataset (None here)."""
    from xpnet.data.datasets import DATASETS

    parser.add_argument("--dataset", choices=list(DATASETS), default=default, help=help)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory of the IDX files (default: $XPNET_DATA_DIR, else the per-user cache)",
    )


def add_setting_flags(parser, names=None):
    """A flag for each TrainConfig setting (those named, where names are given), derived from its
    declaration (src/xpnet/nn/config.py): its type, default, help and choices. Whether a value is
    usable is TrainConfig's to say."""
    from xpnet.nn.config import TrainConfig, setting_flag

    for declared in dataclasses.fields(TrainConfig):
        if names is not None and declared.name not in names:
            continue
        meta, options = declared.metadata, {"default": declared.default, "help": declared.metadata["help"]}
        if declared.type is bool:
            options["action"] = "store_true"
        elif meta["choices"] is not None:
            options["choices"] = list(meta["choices"])
        else:
            lists = {int: int_list, float: number_list}
            options["type"] = {int: integer, float: number, tuple: lists[meta["element"]], str: str}[declared.type]
        parser.add_argument(setting_flag(declared.name), **options)


def add_train_parser(commands):
    from xpnet.nn.recipes import RECIPES

    train = commands.add_parser("train", help="train an MLP and report validation and test accuracy")
    train.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=None,
        help="start from a named recipe's settings, which any flag overrides (xpnet recipes lists them)",
    )
    add_backend_flag(train)
    add_data_flags(train, None, "(default: the checkpoint's with --resume, else mnist)")
    add_setting_flags(train)
    train.add_argument("--save", default=None, help="write a checkpoint (.npz) here after the last epoch")
    train.add_argument("--save-every", type=positive_int, default=None, help="also every N epochs (needs --save)")
    train.add_argument("--resume", default=None, help="continue the run saved in this checkpoint, up to --epochs")
    add_plot_flag(train, "loss and accuracy per epoch")
    train.add_argument(
        "--quiet", action="store_true", help="no progress bar (it is also off when stdout is not a terminal)"
    )
    add_threads_flag(train)
    train.set_defaults(command_module="train")


def add_verify_parser(commands):
    from xpnet.nn.config import AUGMENTATIONS, HIDDEN_ACTIVATIONS

    verify = commands.add_parser("verify", help="check the backends against NumPy float64, op by op and step by step")
    verify.add_argument(
        "--backends", type=name_list, default=None, help="comma-separated (default: every available backend)"
    )
    verify.add_argument("--steps", type=positive_int, default=5, help="training steps to check")
    add_dtype_flag(verify)
    add_data_flags(verify)
    verify.add_argument("--seed", type=int, default=0, help="of the reference run")
    verify.add_argument(
        "--activation", choices=HIDDEN_ACTIVATIONS, default="relu", help="the hidden layers' (784-200-10 model)"
    )
    verify.add_argument("--dropout", type=number, default=0.0, help="the hidden layer's dropout probability, in [0, 1)")
    verify.add_argument("--augment", choices=AUGMENTATIONS, default="none", help="deformations of the training images")
    verify.set_defaults(command_module="verify")


def add_bench_parser(commands):
    bench = commands.add_parser(
        "bench", help="training throughput of each backend, against the matmul floor and PyTorch"
    )
    bench.add_argument(
        "--backends", type=name_list, default=None, help="comma-separated (default: every available backend)"
    )
    bench.add_argument(
        "--batch-sizes", type=int_list, default=None, help="e.g. 128,512 (default 1,64,128,512,2048; --quick 128,512)"
    )
    bench.add_argument(
        "--hidden", type=int_list, nargs="+", default=None, help="one or more architectures, e.g. --hidden 200 800 2048"
    )
    add_dtype_flag(bench)
    bench.add_argument(
        "--optimizer", choices=BENCH_OPTIMIZERS, default="sgd", help="every row's update rule (adam at lr 1e-3)"
    )
    bench.add_argument("--activation", choices=BENCH_ACTIVATIONS, default="relu", help="every row's hidden activation")
    bench.add_argument("--repeats", type=positive_int, default=None, help="timed epochs per row (default 3; --quick 1)")
    bench.add_argument("--quick", action="store_true", help="batch 128 and 512, one timed epoch: under a minute")
    add_threads_flag(bench)
    bench.add_argument(
        "--peers",
        type=peer_list,
        default=None,
        help=f"which installed peers to time, comma-separated from {','.join(PEERS)} (default: all of them)",
    )
    bench.add_argument(
        "--no-peers",
        "--no-torch",
        dest="peers",
        action="store_const",
        const=(),
        help="leave out the PyTorch and JAX rows even when they are installed",
    )
    bench.add_argument("--json", default=None, help="write the results as JSON (schema in bench/README.md)")
    bench.add_argument("--markdown", default=None, help="write the table as Markdown")
    add_plot_flag(bench, "throughput against batch size")
    bench.set_defaults(command_module="bench")


def add_augment_parser(commands):
    from xpnet.nn.config import DEFORMATION_SETTINGS

    augment = commands.add_parser("augment", help="draw training digits beside their deformations, to see the settings")
    augment.add_argument("--grid", required=True, help="the image to write (.png, .svg or .pdf)")
    augment.add_argument("--digits", type=positive_int, default=10, help="rows: the first training image of each class")
    augment.add_argument("--columns", type=positive_int, default=8, help="deformations of each, one per epoch")
    add_backend_flag(augment)
    add_data_flags(augment)
    add_setting_flags(augment, (*DEFORMATION_SETTINGS, "seed"))
    augment.set_defaults(command_module="augment", augment="affine,elastic")


def add_recipes_parser(commands):
    from xpnet.nn.recipes import RECIPES

    recipes = commands.add_parser("recipes", help="list the named recipes: their settings and what they measured")
    recipes.add_argument("name", nargs="?", choices=list(RECIPES), help="one recipe (default: all)")
    recipes.set_defaults(command_module="recipes")


def add_data_parser(commands):
    data = commands.add_parser("data", help="download, verify or describe a dataset")
    data.add_argument("action", choices=["download", "verify", "info"])
    add_data_flags(data)
    data.set_defaults(command_module="data")


def add_checkpoint_parsers(commands):
    evaluate = commands.add_parser(
        "evaluate", help="test accuracy, per-class accuracy and confusion matrix of a checkpoint"
    )
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint of xpnet train --save or model.save")
    add_backend_flag(evaluate)
    add_data_flags(evaluate, None, "(default: the one the checkpoint was trained on, else mnist)")
    add_plot_flag(evaluate, "the confusion matrix")
    evaluate.set_defaults(command_module="evaluate")

    predict = commands.add_parser("predict", help="classify image files with a checkpoint")
    predict.add_argument("--checkpoint", required=True, help="a checkpoint of xpnet train --save or model.save")
    add_backend_flag(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.set_defaults(command_module="predict")


def build_parser():
    from xpnet import __version__

    parser = _Parser(prog="xpnet", description="A from-scratch MLP for MNIST on NumPy, Numba or CuPy.")
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=_Parser)
    adders = (add_train_parser, add_verify_parser, add_bench_parser, add_data_parser, add_checkpoint_parsers)
    for add in (*adders, add_augment_parser, add_recipes_parser):
        add(commands)
    parser.commands = commands  # each subcommand's parser, by name (a recipe sets train's defaults)
    return parser


def parse_args(parser, argv):
    """The arguments of argv; with `train --recipe NAME` the recipe's settings are train's defaults,
    so a flag given still wins over the recipe."""
    args = parser.parse_args(argv)
    if getattr(args, "recipe", None):
        from xpnet.nn.recipes import RECIPES

        parser.commands.choices["train"].set_defaults(**RECIPES[args.recipe].settings)
        args = parser.parse_args(argv)
    return args


def _command(parser, argv):
    """The command's exit code, argparse's own exits (--help, --version, a usage error) included."""
    try:
        args = parse_args(parser, argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code
    if args.command is None:  # bare `xpnet`: say what it can do
        parser.print_help()
        return 0
    return importlib.import_module(f"xpnet.commands.{args.command_module}").run(args)


# What a write to a full or failing disk raises: the output is lost, not the command's fault.
UNWRITABLE_OUTPUT = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}
UNWRITABLE_MESSAGE = "cannot write the output ({reason}); free space or send it elsewhere"


def main(argv=None):
    parser = build_parser()
    try:
        code = _command(parser, argv)
        sys.stdout.flush()  # here, not at exit, so a failure to write is reported below
        return code
    except XpnetError as exc:
        print(f"xpnet: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemError) as exc:
        if not is_interrupt(exc):
            raise
        print("xpnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`xpnet ... | head -1`): stop quietly, as a shell pipeline expects.
        # Python's own flush of stdout at exit would fail again, so stdout now goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer its reader left
    except OSError as exc:
        if exc.errno not in UNWRITABLE_OUTPUT:
            raise
        # Standard output is a full disk or /dev/full: one line where it can still be read.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(
            f"xpnet: error: cannot write the output ({exc.strerror}); free space or send it elsewhere", file=sys.stderr
        )
        return 1
