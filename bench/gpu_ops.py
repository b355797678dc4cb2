"""Where a CuPy training step's time goes: each op's host time (Python, argument checks,
launches) and GPU time, beside the whole step's; then where a whole training epoch's goes.

    python bench/gpu_ops.py [--batch-sizes 512,2048] [--dtype float32] [--markdown PATH]

Host time: the mean wall time of a call, which returns once its kernels are queued. GPU time:
the calls queued behind a kernel that spins until they all are, then timed with CUDA events,
so the GPU runs them back to back and the figure holds no wait for Python. A step whose host
time is well above its GPU time is bound by launching: capturing it as a CUDA graph would
pay. One whose GPU time is the larger is bound by its kernels.

The epoch table splits `Trainer.train_epoch` (what xpnet bench times, on the compiled path)
into its parts, each timed alone from a synchronised start to a synchronised end: an epoch's
order drawn on the host and uploaded (the trainer does it while the GPU runs the epoch
before), the steps with the one read of their losses, and the validation pass (10,000 rows,
as MNIST's). (The pass as it was before its one-kernel count, and its figures, are in
bench/results-gpu-h200.md, calls 4 and 5.) Needs CuPy and a GPU.
"""

import argparse
import contextlib
import time

import cupy
import numpy
from tables import print_table

from xpnet.backends import get_backend
from xpnet.data.synthetic import synthetic_splits
from xpnet.nn.train import TrainConfig, Trainer

N_SAMPLES, HIDDEN, CLASSES = 50_000, 200, 10
CALLS = 20  # per timing: 20 steps queue about 500 launches, within the GPU's queue

SPIN = cupy.RawKernel(
    r"""extern "C" __global__ void spin(long long nanoseconds) {
    long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < nanoseconds);
}""",
    "spin",
)


def host_and_gpu_seconds(call):
    """(host, GPU) seconds per call, as the module's docstring defines them."""
    for _ in range(5):
        call()
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    host = (time.perf_counter() - start) / CALLS
    cupy.cuda.Device().synchronize()
    first, last = cupy.cuda.Event(), cupy.cuda.Event()
    SPIN((1,), (1,), (numpy.int64(1e9 * (3 * CALLS * host + 1e-3)),))  # outlasts queueing the calls
    first.record()
    for _ in range(CALLS):
        call()
    last.record()
    last.synchronize()
    return host, cupy.cuda.get_elapsed_time(first, last) / 1e3 / CALLS


def op_calls(backend, batch_size, dtype):
    """Each op of a 784-200-10 step at batch_size as a call on preallocated arrays, in step order."""
    rng = numpy.random.default_rng(0)
    put = backend.asarray
    images = put(rng.standard_normal((N_SAMPLES, 784)), dtype)
    labels = put(rng.integers(0, CLASSES, N_SAMPLES), numpy.int64)
    rows = put(rng.permutation(N_SAMPLES)[:batch_size])
    W1, W2 = put(rng.standard_normal((HIDDEN, 784)) * 0.05, dtype), put(rng.standard_normal((CLASSES, HIDDEN)), dtype)
    b1, b2 = put(numpy.zeros(HIDDEN), dtype), put(numpy.zeros(CLASSES), dtype)
    empty = lambda *shape: backend.empty(shape, dtype)  # noqa: E731
    x, y = empty(batch_size, 784), backend.empty((batch_size,), numpy.int64)
    h, grad_h, grad_z = empty(batch_size, HIDDEN), empty(batch_size, HIDDEN), empty(batch_size, HIDDEN)
    logits, grad_logits = empty(batch_size, CLASSES), empty(batch_size, CLASSES)
    grad_W1, grad_W2, grad_b1, grad_b2 = empty(*W1.shape), empty(*W2.shape), empty(HIDDEN), empty(CLASSES)
    lr = 1e-4 * batch_size
    return {
        "take_rows (images)": lambda: backend.take_rows(images, rows, out=x),
        "take_rows (labels)": lambda: backend.take_rows(labels, rows, out=y),
        "linear_forward 784->200, relu": lambda: backend.linear_forward(x, W1, b1, "relu", out=h),
        "linear_forward 200->10": lambda: backend.linear_forward(h, W2, b2, out=logits),
        "softmax_cross_entropy": lambda: backend.softmax_cross_entropy(logits, y, grad_out=grad_logits),
        "linear_backward 200<-10, grad x": lambda: backend.linear_backward(
            h, W2, grad_logits, grad_W2, grad_b2, grad_x=grad_h
        ),
        "linear_backward 784<-200, relu mask": lambda: backend.linear_backward(
            x, W1, grad_h, grad_W1, grad_b1, activation="relu", output=h, grad_z=grad_z
        ),
        "sgd_update_all (4 arrays)": lambda: backend.sgd_update_all(
            [W1, b1, W2, b2], [grad_W1, grad_b1, grad_W2, grad_b2], lr
        ),
    }


def whole_step(backend, batch_size, dtype):
    """One reference step of the trainer (gather, forward, loss, backward, update), op by op."""
    trainer = Trainer(backend, synthetic_splits(), TrainConfig(batch_size=batch_size, dtype=dtype), compiled=False)
    return lambda: trainer.step(*trainer.batch(0))


def epoch_parts(backend, batch_size, dtype, repeats=7):
    """Median milliseconds of a train_epoch and of its parts (the module's docstring), with
    MNIST's 10,000 validation rows (xpnet bench's synthetic data has 10)."""
    splits = synthetic_splits(n_validation=10_000)
    trainer = Trainer(backend, splits, TrainConfig(batch_size=batch_size, dtype=dtype))
    trainer.compiled_steps.prepare(trainer.step_losses)
    trainer.train_epoch()  # captures the graphs
    steps = trainer.steps_per_epoch
    val_x, val_y = trainer.val_x, trainer.val_y
    parts = {
        "an epoch's order alone (host draw, upload)": trainer._draw_order,  # run_steps draws it ahead
        f"steps 1-{steps - 1} + losses read": lambda: trainer.run_steps(steps - 1),
        f"step {steps} + next order + validation pass": lambda: trainer.run_steps(1),
        f"validation pass alone ({len(val_y):,} rows)": lambda: trainer.accuracy(val_x, val_y),
        "whole train_epoch": trainer.train_epoch,
    }
    times = {name: [] for name in parts}
    for _ in range(repeats):
        for name, part in parts.items():
            backend.synchronize()
            start = time.perf_counter()
            part()
            backend.synchronize()
            times[name].append(time.perf_counter() - start)
    return [(str(batch_size), name, f"{1e3 * numpy.median(t):.3f}") for name, t in times.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="512,2048")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    args = parser.parse_args()
    backend = get_backend("cupy")
    backend.prepare(args.dtype)
    rows = []
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    for batch_size in batch_sizes:
        calls = {**op_calls(backend, batch_size, args.dtype), "whole step": whole_step(backend, batch_size, args.dtype)}
        for name, call in calls.items():
            host, gpu = host_and_gpu_seconds(call)
            rows.append((str(batch_size), name, f"{host * 1e6:.1f}", f"{gpu * 1e6:.1f}"))
    epoch_rows = [row for batch_size in batch_sizes for row in epoch_parts(backend, batch_size, args.dtype)]
    with open(args.markdown, "w") if args.markdown else contextlib.nullcontext() as markdown:
        title = f"CuPy step, op by op, {args.dtype}: mean microseconds per call"
        print_table(title, ("batch", "op", "host us", "GPU us"), rows, markdown)
        title = f"CuPy training epoch (50,000 samples, CUDA graphs), {args.dtype}: median milliseconds"
        print_table(title, ("batch", "part", "ms"), epoch_rows, markdown)


if __name__ == "__main__":
    main()
