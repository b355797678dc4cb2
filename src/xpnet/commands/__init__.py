"""One module per `xpnet` subcommand; each has run(args) returning the exit code."""

import os

from xpnet.atomic import check_writable
from xpnet.errors import UsageError


def check_outputs(args, *flags):
    """Before any work starts: each output path given by these flags can be written, and with
    --plot matplotlib is installed and writes the format the path's suffix names. A typo then
    costs seconds, not a training run."""
    written = {}  # flag by the file it writes
    for flag in flags:
        path = getattr(args, flag.lstrip("-").replace("-", "_"))
        if path is None:
            continue
        check_writable(path, flag)
        target = os.path.realpath(path)
        if target in written:
            raise UsageError(f"{written[target]} and {flag} both write {path}; give each its own file")
        written[target] = flag
    if "--plot" in flags and args.plot:
        from xpnet.plots import image_format, pyplot

        image_format(args.plot)
        pyplot()


def console(width=120):
    """A rich Console; off a terminal (a pipe, a log) `width` columns wide, so tables are not cut at 80."""
    from rich.console import Console

    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=width)
