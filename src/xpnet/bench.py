"""Throughput measurement shared by `xpnet bench` and the pytest-benchmark suite in bench/.

What is timed: whole training epochs of 50,000 samples (gather, forward, loss, backward,
update), after a warm-up epoch, with the backend synchronised before each clock read, so a
GPU's queued work is counted. JIT compile time is measured apart (Backend.prepare) and never
inside an epoch. Alongside, in the same process and run, the "floor": the same five matrix
products per step (forward x2, grad W x2, grad x of layer 2) timed alone with NumPy, each in
the layout Numba's compiled loop uses (the faster), and the peers that are installed
(src/xpnet/bench_peers.py: PyTorch eager and torch.compile, JAX's jit of a step and of an epoch).
Numbers are medians of repeats with their min-max spread: this machine is shared and noisy,
so only ratios taken in one run are comparable.
"""

import statistics
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy

from xpnet.backends.blas import FEATURE_MAJOR_BELOW
from xpnet.data.synthetic import synthetic_splits
from xpnet.nn.train import TrainConfig, Trainer, seed_lr

N_SAMPLES = 50_000
# A GPU clocks down while the CPU rows run (it idles at a fraction of its busy clock), and
# one epoch of a few milliseconds is too short to bring it back: each GPU row first runs this long
# untimed, as a training run's earlier epochs would have.
GPU_WARM_UP_SECONDS = 0.3
# OpenBLAS's second thread keeps spinning on its core after a product, against whatever runs
# next: measured on the 2-core machine, one core busy for 110 ms after the last call. A
# contender whose products run on BLAS's threads is followed by this long untimed.
OPENBLAS_SETTLE_SECONDS = 0.2


class StepRule(NamedTuple):
    """What each timed step computes besides the products: the update rule and the hidden layers'
    activation, the same for every row of a run. SGD runs at seed_lr(batch) (1e-4 per sample, so no
    row diverges); Adam at torch's default rate, 1e-3."""

    optimizer: str = "sgd"
    activation: str = "relu"

    def lr(self, batch_size):
        return seed_lr(batch_size) if self.optimizer == "sgd" else 1e-3

    def config(self, batch_size, hidden, dtype):
        """The TrainConfig of xpnet's rows."""
        return TrainConfig(
            batch_size=batch_size, lr=self.lr(batch_size), hidden=hidden, dtype=dtype,
            optimizer=self.optimizer, activation=self.activation,
        )  # fmt: skip

    def label(self):
        """'' for SGD and ReLU, else what differs, as a row's name ends: ' [adam, tanh]'."""
        changed = [value for value, default in zip(self, StepRule()) if value != default]
        return f" [{', '.join(changed)}]" if changed else ""


SGD_RELU = StepRule()
# The rules the peers write too (bench_peers.py): xpnet's own rows take any TrainConfig.
BENCH_OPTIMIZERS, BENCH_ACTIVATIONS = ("sgd", "adam"), ("relu", "tanh", "sigmoid", "gelu")


@dataclass
class Result:
    name: str  # backend, "floor (numpy matmuls)" or "torch eager (cpu)"
    batch_size: int
    hidden: tuple
    dtype: str
    samples_per_second: float  # median over repeats
    spread: tuple  # (min, max) samples/s over repeats
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self):
        return {**asdict(self), "hidden": list(self.hidden), "spread": list(self.spread)}


@dataclass
class Contender:
    """One thing to time: an epoch function, how to synchronise, and its row's labels."""

    name: str
    run_epoch: object
    synchronize: object
    n_samples: int
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    host_arrays: bool = True  # its temporaries are NumPy arrays, which tracemalloc sees
    # How long its own thread pool keeps spinning after its work, slowing whatever runs next:
    # the next contender runs that long untimed before its clock starts.
    settle_seconds: float = 0.0
    # Its work runs on a GPU, which idles at low clocks while CPU contenders run: one GPU epoch is
    # too short to ramp them, so it first runs GPU_WARM_UP_SECONDS untimed before each timing.
    gpu: bool = False
    # A peer's failure (a library version that breaks its recipe) drops its row, not the run's.
    peer: bool = False


def epoch_allocation_peak(contender):
    """Peak bytes of host memory allocated during one (untimed) epoch: the step's temporaries,
    not the resident data and weights. Traced apart from timing, since tracing slows it."""
    tracemalloc.start()
    try:
        contender.run_epoch()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def time_interleaved(contenders, repeats, warm_up=True):
    """Seconds per epoch of each contender: one warm-up epoch each (unless warm_up is False: the
    caller ran them), then `repeats` rounds that time every contender once in turn, so drift of
    a shared machine hits all alike. Each clock read follows a synchronize, so queued GPU work is
    counted. A contender that follows one with settle_seconds, or runs on a GPU, first runs untimed
    for at least that long (GPU_WARM_UP_SECONDS on a GPU)."""
    if warm_up:
        for contender in contenders:
            contender.run_epoch()
            contender.synchronize()
    seconds = {id(c): [] for c in contenders}
    previous = contenders[-1]
    for _ in range(repeats):
        for contender in contenders:
            _lead_in(contender, max(previous.settle_seconds, GPU_WARM_UP_SECONDS if contender.gpu else 0.0))
            contender.synchronize()
            start = time.perf_counter()
            contender.run_epoch()
            contender.synchronize()
            seconds[id(contender)].append(time.perf_counter() - start)
            previous = contender
    return [seconds[id(c)] for c in contenders]


def _lead_in(contender, seconds):
    """Untimed epochs of the contender for at least `seconds`: the spinning threads of the one
    before it quieten meanwhile, and its own are awake when the clock starts (a pause instead
    would leave them asleep: JAX's scanned epoch ran at 355k samples/s after a 0.5 s pause
    against 445k straight after its own work)."""
    if seconds:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            contender.run_epoch()
            contender.synchronize()


def runs(contender, log):
    """Whether one untimed epoch of the contender (its warm-up) runs; a peer's error is told,
    others' raised."""
    try:
        contender.run_epoch()
        contender.synchronize()
        return True
    except Exception as exc:
        if not contender.peer:
            raise
        log(f"{contender.name} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}): its row left out")
        return False


def measure(contenders, batch_size, hidden, dtype, repeats, log=print):
    results = []
    contenders = [c for c in contenders if runs(c, log)]  # a peer that fails loses its row
    for contender, epoch_seconds in zip(contenders, time_interleaved(contenders, repeats, warm_up=False)):
        if contender.host_arrays:
            contender.extra["epoch_alloc_mib"] = epoch_allocation_peak(contender) / 2**20
        rates = [contender.n_samples / s for s in epoch_seconds]
        results.append(
            Result(
                contender.name,
                batch_size,
                tuple(hidden),
                dtype,
                statistics.median(rates),
                (min(rates), max(rates)),
                contender.compile_seconds,
                dict(contender.extra),
            )
        )
    return results


def backend_contender(
    backend, batch_size, hidden=(200,), dtype="float32", splits=None, compiled=None, threads=None, rule=SGD_RELU
):
    """A backend's training epoch, with the trainer's BLAS thread policy; compiled=False times
    its reference loop even where it has a compiled one (the row named "<backend> (op by op)"),
    to show what compiling the loop buys."""
    compile_seconds = backend.prepare(dtype)
    splits = splits or synthetic_splits()
    trainer = Trainer(backend, splits, rule.config(batch_size, hidden, dtype), compiled=compiled, threads=threads)
    if trainer.compiled_steps is not None:
        start = time.perf_counter()
        trainer.compiled_steps.prepare(trainer.step_losses)
        compile_seconds += time.perf_counter() - start
    host = backend.xp is numpy
    return Contender(
        (backend.name if compiled is not False else f"{backend.name} (op by op)") + rule.label(),
        trainer.train_epoch,
        backend.synchronize,
        len(splits.train),
        compile_seconds,
        extra={"compiled": trainer.compiled_steps is not None},
        host_arrays=host,
        settle_seconds=OPENBLAS_SETTLE_SECONDS if host else 0.0,
        gpu=not host,
    )


def floor_contender(batch_size, hidden=(200,), dtype="float32", n_samples=N_SAMPLES):
    """The matrix products of an epoch alone: each layer's forward and grad W, and grad x of
    every layer but the first, on preallocated NumPy arrays. Below FEATURE_MAJOR_BELOW rows the
    layer outputs are feature-major, as in Numba's compiled loop, where that makes the
    forward product faster: the floor is the products done the faster way."""
    rng = numpy.random.default_rng(0)
    sizes = [784, *hidden, 10]
    weights = [rng.standard_normal((o, i)).astype(dtype) for i, o in zip(sizes[:-1], sizes[1:])]
    feature_major = batch_size < FEATURE_MAJOR_BELOW
    acts = [rng.standard_normal((batch_size, sizes[0])).astype(dtype)] + [
        rng.standard_normal((n, batch_size)).astype(dtype).T if feature_major else
        rng.standard_normal((batch_size, n)).astype(dtype) for n in sizes[1:]
    ]  # fmt: skip
    grads = [numpy.empty_like(a, order="C") for a in acts]
    grad_w = [numpy.empty_like(w) for w in weights]
    steps = -(-n_samples // batch_size)

    def epoch():
        for _ in range(steps):
            for i, W in enumerate(weights):
                if feature_major:
                    numpy.matmul(W, acts[i].T, out=acts[i + 1].T)
                else:
                    numpy.matmul(acts[i], W.T, out=acts[i + 1])
            for i in reversed(range(len(weights))):
                numpy.matmul(acts[i + 1].T, acts[i], out=grad_w[i])
                if i > 0:
                    numpy.matmul(acts[i + 1], weights[i], out=grads[i])

    return Contender(
        "floor (numpy matmuls)", epoch, lambda: None, steps * batch_size, settle_seconds=OPENBLAS_SETTLE_SECONDS
    )


def agreement(backend, dtype, steps=10, batch_size=512, hidden=(200,), splits=None, rule=SGD_RELU):
    """Largest relative difference of the loss and of the weights after `steps` free-running
    steps from the same seed, against the NumPy float64 reference."""
    from xpnet.backends import get_backend

    splits = splits or synthetic_splits(n_train=steps * batch_size)
    runs = []
    for b, d in ((get_backend("numpy"), "float64"), (backend, dtype)):
        trainer = Trainer(b, splits, rule.config(batch_size, hidden, d))
        losses = trainer.run_steps(steps)
        runs.append((losses, [b.to_numpy(p.value).astype(numpy.float64) for p in trainer.model.parameters()]))
    (ref_loss, ref_w), (loss, w) = runs
    loss_rel = float(numpy.max(numpy.abs(loss - ref_loss) / numpy.abs(ref_loss)))
    weight_rel = max(float(numpy.max(numpy.abs(a - r)) / numpy.max(numpy.abs(r))) for a, r in zip(w, ref_w))
    return loss_rel, weight_rel
