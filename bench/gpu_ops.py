"""Where a CuPy training step's time goes: each op's host time (Python, argument checks,
launches) and GPU time, beside the whole step's.

    python bench/gpu_ops.py [--batch-sizes 512,2048] [--dtype float32] [--markdown PATH]

Host time: the mean wall time of a call, which returns once its kernels are queued. GPU time:
the calls queued behind a kernel that spins until they all are, then timed with CUDA events,
so the GPU runs them back to back and the figure holds no wait for Python. A step whose host
time is well above its GPU time is bound by launching: capturing it as a CUDA graph would
pay. One whose GPU time is the larger is bound by its kernels. Needs CuPy and a GPU.
"""

import argparse
import time

import cupy
import numpy
from rich.console import Console
from rich.table import Table

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
        "linear_forward 784->200, relu": lambda: backend.linear_forward(x, W1, b1, relu=True, out=h),
        "linear_forward 200->10": lambda: backend.linear_forward(h, W2, b2, out=logits),
        "softmax_cross_entropy": lambda: backend.softmax_cross_entropy(logits, y, grad_out=grad_logits),
        "linear_backward 200<-10, grad x": lambda: backend.linear_backward(
            h, W2, grad_logits, grad_W2, grad_b2, grad_x=grad_h
        ),
        "linear_backward 784<-200, relu mask": lambda: backend.linear_backward(
            x, W1, grad_h, grad_W1, grad_b1, relu_output=h, grad_z=grad_z
        ),
        "sgd_update x4": lambda: [
            backend.sgd_update(p, g, lr) for p, g in ((W1, grad_W1), (b1, grad_b1), (W2, grad_W2), (b2, grad_b2))
        ],
    }


def whole_step(backend, batch_size, dtype):
    """One reference step of the trainer (gather, forward, loss, backward, update), op by op."""
    trainer = Trainer(backend, synthetic_splits(), TrainConfig(batch_size=batch_size, dtype=dtype), compiled=False)
    return lambda: trainer.step(*trainer.batch(0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="512,2048")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    args = parser.parse_args()
    backend = get_backend("cupy")
    backend.prepare(args.dtype)
    rows = []
    for batch_size in map(int, args.batch_sizes.split(",")):
        calls = {**op_calls(backend, batch_size, args.dtype), "whole step": whole_step(backend, batch_size, args.dtype)}
        for name, call in calls.items():
            host, gpu = host_and_gpu_seconds(call)
            rows.append((str(batch_size), name, f"{host * 1e6:.1f}", f"{gpu * 1e6:.1f}"))
    title = f"CuPy step, op by op, {args.dtype}: mean microseconds per call"
    columns = ("batch", "op", "host us", "GPU us")
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)
    if args.markdown:
        lines = [title, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n")


if __name__ == "__main__":
    main()
