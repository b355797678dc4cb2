"""What a training step costs on the GPU, kernel by kernel, for xpnet and its fastest peers.

    python bench/gpu_profile.py [--batch-sizes 128,512,2048] [--markdown PATH]

Three measurements, each in its own table, for issue 29 ("measure first"):

1. The cost of a graph node on this card: a chain of N empty kernels captured as one CUDA graph
   and replayed, timed with CUDA events. The slope between N=100 and N=2000 is what each
   dependent node costs before it does any work, for a one-block kernel and for one block per
   multiprocessor (the launch ramps over more of the chip).
2. Each contender's epoch as its kernels: PyTorch's profiler (CUPTI, which sees every kernel in
   the process, CuPy's graph nodes and XLA's too) around one warm epoch of xpnet's CuPy steps,
   JAX's scanned epoch (float32 precision and its default) and torch's captured step; xpnet's
   twice, its output layer as cupy_head's kernels and as cuBLAS's products. Per step:
   kernels, the sum of their durations, and the span from the epoch's first kernel to its last.
   The span less the sum is time the GPU spent between kernels.
3. Each contender's kernels by name: how many per step and their mean duration.

Plus JAX's compiled HLO: its fusions and custom calls (cuBLAS products), which the scan's body
runs once a step. Needs CuPy, torch and JAX on a GPU; a part whose library fails says so and
the others still run.
"""

import argparse
import collections
import contextlib
import sys
import traceback

import numpy
from tables import print_table

N_SAMPLES = 50_000
CHAIN_LENGTHS = (100, 2000)
REPLAYS = 20


def median_replay_milliseconds(graph, stream):
    import cupy

    graph.launch(stream)  # the first replay uploads the graph
    stream.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(numpy.median(times))


def node_cost_rows():
    """(kernel shape, microseconds per node) for chains of empty kernels captured as one graph."""
    import cupy

    nothing = cupy.RawKernel('extern "C" __global__ void nothing(int* unused) {}', "nothing")
    blocks_per_chip = cupy.cuda.Device().attributes["MultiProcessorCount"]
    unused = cupy.zeros(1, numpy.int32)
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    for label, blocks in (("1 block of 32 threads", 1), (f"{blocks_per_chip} blocks of 256 threads", blocks_per_chip)):
        threads = 32 if blocks == 1 else 256
        milliseconds = []
        for length in CHAIN_LENGTHS:
            with stream:
                nothing((blocks,), (threads,), (unused,))  # loads the module outside the capture
                stream.synchronize()
                stream.begin_capture()
                for _ in range(length):
                    nothing((blocks,), (threads,), (unused,))
                graph = stream.end_capture()
            milliseconds.append(median_replay_milliseconds(graph, stream))
        slope = (milliseconds[1] - milliseconds[0]) * 1e3 / (CHAIN_LENGTHS[1] - CHAIN_LENGTHS[0])
        rows.append((label, *(f"{m:.3f}" for m in milliseconds), f"{slope:.2f}"))
    return rows


def profiled_kernels(epoch, synchronize):
    """[(name, start us, duration us)] of every GPU kernel and copy that epoch() ran, by CUPTI."""
    import torch

    epoch()  # warm: compiled, captured, uploaded
    synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        epoch()
        synchronize()
    kernels = []
    for event in profile.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels.append((event.name, event.time_range.start, event.time_range.elapsed_us()))
    return sorted(kernels, key=lambda kernel: kernel[1])


def xpnet_epochs(batch_size):
    """One epoch of xpnet's compiled CuPy steps on random data (what xpnet bench times), with the
    output layer as cupy_head's kernels (the default) and as cuBLAS's products and the loss kernel."""
    from xpnet.backends import get_backend
    from xpnet.bench import backend_contender

    found = []
    for fused, name in ((True, "xpnet cupy (CUDA graphs)"), (False, "xpnet cupy (graphs, cuBLAS head)")):
        contender = backend_contender(get_backend("cupy"), batch_size)
        trainer = contender.run_epoch.__self__  # the contender runs Trainer.train_epoch
        trainer.compiled_steps.fused_head = fused  # before its first epoch captures a graph
        found.append((name, contender.run_epoch, contender.synchronize))
    return found


def peer_epochs(batch_size):
    """(name, epoch, synchronize) of JAX's scanned epochs and torch's captured step."""
    from xpnet.bench_peers import jax_contenders, torch_step_graph_contender

    found = []
    for make in (lambda: jax_contenders(batch_size)[1:], lambda: [torch_step_graph_contender(batch_size)]):
        try:
            found += [(c.name, c.run_epoch, c.synchronize) for c in make()]
        except Exception:  # a peer that fails here loses its rows only
            traceback.print_exc()
    return found


def kernel_rows(batch_size, contenders):
    """The per-step table's rows and the by-name table's rows of each contender's epoch."""
    steps = -(-N_SAMPLES // batch_size)
    per_step, by_name = [], []
    for name, epoch, synchronize in contenders:
        try:
            kernels = profiled_kernels(epoch, synchronize)
        except Exception:
            traceback.print_exc()
            continue
        busy = sum(duration for _, _, duration in kernels)
        span = kernels[-1][1] + kernels[-1][2] - kernels[0][1] if kernels else 0.0
        per_step.append(
            (str(batch_size), name, f"{len(kernels) / steps:.1f}", f"{busy / steps:.1f}", f"{span / steps:.1f}",
             f"{(span - busy) / max(len(kernels), 1):.2f}")
        )  # fmt: skip
        counts, totals = collections.Counter(), collections.Counter()
        for kernel, _, duration in kernels:
            counts[kernel] += 1
            totals[kernel] += duration
        for kernel, total in totals.most_common(12):
            by_name.append(
                (str(batch_size), name, kernel[:70], f"{counts[kernel] / steps:.2f}", f"{total / counts[kernel]:.2f}")
            )
    return per_step, by_name


def jax_hlo_rows(batch_size):
    """(precision, fusions, custom calls, other kernels' instructions) in the compiled scanned epoch."""
    import jax
    import jax.numpy as jnp

    from xpnet.bench_peers import JAX_DEFAULT, JAX_FLOAT32, jax_sgd_step

    rng = numpy.random.default_rng(0)
    params = [
        (jnp.asarray(rng.standard_normal((n_out, n_in)), jnp.float32), jnp.zeros(n_out, jnp.float32))
        for n_in, n_out in ((784, 200), (200, 10))
    ]
    x_all = jnp.asarray(rng.standard_normal((N_SAMPLES, 784)), jnp.float32)
    y_all = jnp.asarray(rng.integers(0, 10, N_SAMPLES))
    full = N_SAMPLES // batch_size
    rows = []
    for label, precision in (("float32", JAX_FLOAT32), ("default", JAX_DEFAULT)):
        step = jax_sgd_step(0.05, precision)

        def scanned(params, order, step=step):
            batches = order[: full * batch_size].reshape(full, batch_size)
            return jax.lax.scan(lambda p, rows: step(p, x_all, y_all, rows), params, batches)

        text = jax.jit(scanned).lower(params, jnp.arange(N_SAMPLES)).compile().as_text()
        opcodes = collections.Counter()
        for line in text.splitlines():
            for opcode in ("fusion(", "custom-call(", "gather(", "scatter(", "dot("):
                if f" {opcode}" in line and "=" in line:
                    opcodes[opcode.rstrip("(")] += 1
        rows.append((str(batch_size), label, *(str(opcodes[o]) for o in ("fusion", "custom-call", "dot", "gather"))))
    return rows


def attempt(part, *args):
    """part(*args), or [] with its traceback printed: one failing measurement loses its own rows."""
    try:
        return part(*args)
    except Exception:
        traceback.print_exc()
        return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="128,512,2048")
    parser.add_argument("--markdown", default=None, help="also write the tables as Markdown here")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    with open(args.markdown, "w") if args.markdown else contextlib.nullcontext() as markdown:
        columns = ("kernel", *(f"{n} nodes, ms" for n in CHAIN_LENGTHS), "us per node")
        print_table(
            "Empty kernels chained in one CUDA graph, replayed", columns, attempt(node_cost_rows), markdown, width=160
        )
        per_step, by_name, hlo = [], [], []
        for batch_size in batch_sizes:
            contenders = [*attempt(xpnet_epochs, batch_size), *peer_epochs(batch_size)]
            rows = attempt(kernel_rows, batch_size, [c for c in contenders if c])
            per_step += rows[0] if rows else []
            by_name += rows[1] if rows else []
            hlo += attempt(jax_hlo_rows, batch_size)
        columns = ("batch", "contender", "kernels/step", "busy us/step", "span us/step", "gap us/kernel")
        print_table("One warm epoch's kernels (CUPTI), float32, 784-200-10", columns, per_step, markdown, width=160)
        columns = ("batch", "contender", "kernel", "per step", "mean us")
        print_table("The kernels by name, most time first", columns, by_name, markdown, width=160)
        columns = ("batch", "precision", "fusions", "custom calls", "dots", "gathers")
        print_table("JAX's compiled scanned epoch (HLO instructions)", columns, hlo, markdown, width=160)
    return 0


if __name__ == "__main__":
    sys.exit(main())
