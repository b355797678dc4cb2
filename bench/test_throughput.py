"""pytest-benchmark suite: each op, one training step through the layers, and an epoch the
way training runs it (Numba's compiled loop), per backend, batch size and dtype.

    pytest bench/ --benchmark-only [--benchmark-json out.json] [--benchmark-compare]

Every timed call ends with backend.synchronize(), so GPU work is inside the timed region;
compilation (backend.prepare) and a warm-up call happen before timing starts.
"""

import numpy
import pytest

from xpnet.backends import REGISTRY
from xpnet.bench import backend_contender
from xpnet.data.synthetic import synthetic_splits
from xpnet.nn.train import TrainConfig, Trainer

BATCH_SIZES = [1, 64, 128, 512, 2048]
DTYPES = ["float32", "float64"]
# The real backends only: the CPU emulation of the CuPy backend has no speed worth timing.
EVERY_BACKEND = pytest.mark.parametrize("backend", list(REGISTRY), indirect=True)


def synchronised(backend, fn):
    def call():
        result = fn()
        backend.synchronize()
        return result

    return call


def setup_ops(backend, batch, dtype):
    rng = numpy.random.default_rng(0)
    put = lambda shape: backend.asarray(rng.standard_normal(shape).astype(dtype))
    x, W, b = put((batch, 784)), put((200, 784)), put(200)
    y = backend.linear_forward(x, W, b, "relu")
    labels = backend.asarray(rng.integers(0, 10, batch))
    grad_W, grad_b, grad_z = (
        backend.empty((200, 784), dtype),
        backend.empty((200,), dtype),
        backend.empty(y.shape, dtype),
    )
    logits, grad_y = put((batch, 10)), put((batch, 200))
    return {
        "linear_forward": lambda: backend.linear_forward(x, W, b, "relu", out=y),
        "linear_backward": lambda: backend.linear_backward(
            x, W, grad_y, grad_W, grad_b, activation="relu", output=y, grad_z=grad_z
        ),
        "relu": lambda: backend.relu(grad_y, out=grad_y),
        "relu_backward": lambda: backend.relu_backward(y, grad_y, out=grad_y),
        "softmax_cross_entropy": lambda: backend.softmax_cross_entropy(logits, labels),
        "sgd_update": lambda: backend.sgd_update(W, grad_W, 1e-12),
    }


@EVERY_BACKEND
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(
    "op", ["linear_forward", "linear_backward", "relu", "relu_backward", "softmax_cross_entropy", "sgd_update"]
)
def test_op(benchmark, backend, op, batch, dtype):
    backend.prepare(dtype)
    fn = synchronised(backend, setup_ops(backend, batch, dtype)[op])
    fn()  # warm-up outside the timing
    benchmark.group = f"{op} batch={batch} {dtype}"
    benchmark(fn)


@EVERY_BACKEND
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_training_step(benchmark, backend, batch, dtype):
    backend.prepare(dtype)
    trainer = Trainer(backend, synthetic_splits(n_train=max(4096, batch)), TrainConfig(batch_size=batch, dtype=dtype))
    x, y = trainer.batch(0)
    step = synchronised(backend, lambda: trainer.step(x, y))
    step()
    benchmark.group = f"training step batch={batch} {dtype}"
    benchmark(step)


@EVERY_BACKEND
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_training_epoch(benchmark, backend, batch, dtype):
    """An epoch of 4,096 samples through Trainer.train_epoch, the path `xpnet train` takes: the
    compiled loop where the backend has one (test_training_step times the layers' step,
    which it does not use). Samples/s is in extra_info; `xpnet bench` times full epochs."""
    contender = backend_contender(backend, batch, dtype=dtype, splits=synthetic_splits(n_train=4096))
    epoch = synchronised(backend, contender.run_epoch)
    epoch()
    benchmark.group = f"training epoch batch={batch} {dtype}"
    benchmark.extra_info["compiled"] = contender.extra["compiled"]
    benchmark(epoch)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["samples_per_second"] = contender.n_samples / benchmark.stats.stats.median
