"""`xpnet verify`: print the agreement table; exit 1 when a backend disagrees."""

import sys

from rich.table import Table

from xpnet.backends import available_backends, get_backend
from xpnet.commands import console
from xpnet.data import load_dataset
from xpnet.verify import summarize, verify


def run(args):
    candidates = [get_backend(name) for name in (args.backends or available_backends())]
    splits = load_dataset(args.dataset, args.data_dir)
    for backend in candidates:
        backend.prepare(args.dtype)
    settings = {"seed": args.seed, "activation": args.activation, "dropout": args.dropout, "augment": args.augment}
    checks = verify(candidates, splits, steps=args.steps, dtype=args.dtype, **settings)
    dropout = f", dropout {args.dropout:g}" if args.dropout else ""
    augment = f", deformed {args.augment}" if args.augment != "none" else ""
    title = f"{args.dtype}, {args.activation}{dropout}{augment}, against NumPy float64, worst over {args.steps} steps"
    table = Table(title=f"{title} (error/bound <= 1 passes)")
    for column in ("op", "backend", "max abs err", "max rel err", "tolerance", "error/bound", "result"):
        table.add_column(column, justify="left" if column in ("op", "backend") else "right")
    for check in summarize(checks):
        table.add_row(
            check.op,
            check.backend,
            f"{check.max_abs:.2e}",
            f"{check.max_rel:.2e}",
            f"{check.tolerance:.2e}",
            f"{check.bound_used:.3f}",
            "pass" if check.passed else "[bold red]FAIL",
        )
    console().print(table)
    failed = [check for check in checks if not check.passed]
    if failed:
        first = failed[0]
        print(
            f"xpnet verify: {first.backend} disagrees first at step {first.step}, {first.op}: "
            f"error {first.max_abs:.3g} is {first.bound_used:.3g}x its bound",
            file=sys.stderr,
        )
        return 1
    print(
        f"All {len(checks)} checks agree: {', '.join(b.name for b in candidates)} ({args.dtype}, {args.steps} steps)."
    )
    return 0
