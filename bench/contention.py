"""Two identical trainings at once on a shared machine, against one alone.

    python bench/contention.py [--backends numba,numpy,jax] [--threads auto,2] [--epochs 6] [--data-dir DIR]

For each backend and --threads setting: one `xpnet train` alone, then two started together;
each run's throughput is the median samples/s of its epochs after the first (the first
compiles and warms caches), and the table gives each of the pair against the run alone. Whole
processes, so what one does to the other (BLAS threads spinning for cores the other holds) is
in the figures. Run it on a machine doing nothing else.

"jax" runs JAX's jit + lax.scan epoch (xpnet.bench_peers) on random data of MNIST's shape at
the seed recipe's batch size, in a process of this script's own; XLA keeps its own threads,
so --threads does not apply to it and it runs once.
"""

import argparse
import re
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

EPOCH = re.compile(r"^Epoch (\d+) - .*?([\d,]+) samples/s", re.MULTILINE)


def start(backend, threads, epochs, data_dir):
    if backend == "jax":
        command = [sys.executable, __file__, "--jax-epochs", str(epochs)]
    else:
        command = [sys.executable, "-m", "xpnet", "train", "--backend", backend, "--threads", threads]
        command += ["--epochs", str(epochs), "--quiet"] + (["--data-dir", data_dir] if data_dir else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_jax(epochs):
    """JAX's scanned epochs, printed as `xpnet train` prints its own."""
    from xpnet.bench_peers import jax_contenders
    from xpnet.nn.train import TrainConfig

    contender = jax_contenders(TrainConfig().batch_size)[1]  # jit + scan epoch
    for epoch in range(1, epochs + 1):
        begin = time.perf_counter()
        contender.run_epoch()
        contender.synchronize()
        print(f"Epoch {epoch} - {contender.n_samples / (time.perf_counter() - begin):,.0f} samples/s", flush=True)


def throughput(process):
    """Median samples/s over the epochs after the first."""
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a training process failed: {err.strip()}")
    rates = [float(rate.replace(",", "")) for epoch, rate in EPOCH.findall(out) if int(epoch) > 1]
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numba,numpy")
    parser.add_argument("--threads", default="auto,2", help="the --threads settings to compare")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--jax-epochs", type=int, help=argparse.SUPPRESS)  # the JAX training process itself
    args = parser.parse_args()
    if args.jax_epochs:
        return train_jax(args.jax_epochs)
    table = Table(title=f"Two trainings at once against one alone ({args.epochs} epochs each, samples/s)")
    for column in ("backend", "--threads", "alone", "together: first", "together: second", "each / alone"):
        table.add_column(column, justify="left" if column in ("backend", "--threads") else "right")
    for backend in args.backends.split(","):
        for threads in ["n/a"] if backend == "jax" else args.threads.split(","):
            alone = throughput(start(backend, threads, args.epochs, args.data_dir))
            pair = [start(backend, threads, args.epochs, args.data_dir) for _ in range(2)]
            first, second = (throughput(p) for p in pair)
            ratio = f"{first / alone:.2f}, {second / alone:.2f}"
            table.add_row(backend, threads, f"{alone:,.0f}", f"{first:,.0f}", f"{second:,.0f}", ratio)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
