"""`xpnet bench`."""

from xpnet.backends import available_backends, get_backend
from xpnet.bench import N_SAMPLES, StepRule
from xpnet.bench_peers import PEERS
from xpnet.bench_report import run_report
from xpnet.commands import check_outputs
from xpnet.errors import UsageError
from xpnet.nn.config import TrainConfig
from xpnet.nn.memory import check_memory
from xpnet.threads import blas_threads


def run(args):
    check_outputs(args, "--json", "--markdown", "--plot")
    backends = [get_backend(name) for name in (args.backends or available_backends())]
    batch_sizes = args.batch_sizes or ((128, 512) if args.quick else (1, 64, 128, 512, 2048))
    check_sizes(batch_sizes, args.hidden or [(200,)], args.dtype)
    repeats = args.repeats or (1 if args.quick else 3)
    # A count limits everything timed, the floor and the peers too; auto lets each trainer choose.
    with blas_threads(None if args.threads == "auto" else args.threads):
        return report(args, backends, batch_sizes, repeats)


def check_sizes(batch_sizes, hiddens, dtype):
    """Refuse, before any timing, a batch larger than the epoch the bench times, or sizes whose
    arrays cannot fit in the host's memory (the floor and numpy rows hold them there)."""
    largest = max(batch_sizes)
    if largest > N_SAMPLES:
        raise UsageError(
            f"--batch-sizes {largest} is larger than the {N_SAMPLES:,}-sample epoch xpnet bench times; "
            f"choose at most {N_SAMPLES}"
        )
    for hidden in hiddens:
        config = TrainConfig(batch_size=largest, hidden=hidden, dtype=dtype)
        check_memory(get_backend("numpy"), [784, *hidden, 10], config, N_SAMPLES)


def report(args, backends, batch_sizes, repeats):
    return run_report(
        backends,
        batch_sizes,
        args.hidden or [(200,)],
        args.dtype,
        repeats,
        peers=PEERS if args.peers is None else args.peers,
        json_path=args.json,
        markdown_path=args.markdown,
        agreement_steps=3 if args.quick else 10,
        plot_path=args.plot,
        threads=args.threads,
        rule=StepRule(args.optimizer, args.activation),
    )
