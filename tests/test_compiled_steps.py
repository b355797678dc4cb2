"""The Numba backend's compiled training loop (src/xpnet/backends/numba_steps.py): each op of a
compiled step within verify's one-op bounds, at any depth, dtype, batch size (1 included,
where the products are gemv) and output layout; its gather, its cache, and its two threads.
Whole runs against the reference loop for every setting are in test_fast_paths.py."""

import dataclasses
import os
import subprocess
import sys

import numpy
import pytest

import xpnet
from xpnet.backends import numba_steps
from xpnet.backends.numba_kernels import take_normalized_rows
from xpnet.backends.steps import TrainingData
from xpnet.data.synthetic import synthetic_splits
from xpnet.verify import check_compiled_step

pytestmark = pytest.mark.skipif(numba_steps.BLAS is None, reason="NumPy's own BLAS routines were not found here")

OPTIONS = {
    "plain": {},
    "decay": {"weight_decay": 1e-3},
    "momentum": {"momentum": 0.9},
    "nesterov-decay-cosine": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "schedule": "cosine"},
}


def with_layout(trainer, feature_major, images):
    """The trainer with its compiled loop rebuilt to keep layer outputs feature-major or not (None:
    the loop's own choice), gathering from the uint8 images as training does (None: from the
    normalised rows)."""
    data = TrainingData(trainer.train_x, trainer.train_y, images)
    trainer.compiled_steps = numba_steps.CompiledLoop(
        trainer.model, trainer.optimizer, data, trainer.config.batch_size, feature_major=feature_major
    )
    return trainer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("hidden", [(200,), (32, 16)])
@pytest.mark.parametrize("feature_major", [False, True])
def test_each_op_of_a_compiled_step_is_within_its_bound(dtype, batch, hidden, feature_major):
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=hidden, dtype="float64", lr=0.05)
    reference = xpnet.Trainer("numpy", data, config)
    compiled = xpnet.Trainer("numba", data, dataclasses.replace(config, dtype=dtype))
    compiled = with_layout(compiled, feature_major, data.train.images)
    for step in range(1, 4):
        _, labels = reference.batch(reference.epoch_step)
        checks = check_compiled_step(step, compiled, reference.model, labels)
        assert len(checks) == 5 * len(hidden) + 6  # gather, loss, grad; forward, mask, grad x, W and b by layer
        failed = [(c.op, c.bound_used) for c in checks if not c.passed]
        assert not failed
        if dtype == "float32":  # the products do round: the bounds are being used
            assert any(c.max_abs > 0 for c in checks)
        reference.run_steps(1)


@pytest.mark.parametrize("batch", [7, 128])
@pytest.mark.parametrize("feature_major", [False, True])
def test_an_epochs_last_batch_of_one_row_is_within_its_bound(batch, feature_major):
    data = synthetic_splits(n_train=2 * batch + 1)  # the last batch is one row: every product a gemv-shaped edge
    config = xpnet.TrainConfig(batch_size=batch, hidden=(32, 16), dtype="float64", lr=0.05)
    reference = xpnet.Trainer("numpy", data, config)
    compiled = xpnet.Trainer("numba", data, dataclasses.replace(config, dtype="float32"))
    compiled = with_layout(compiled, feature_major, data.train.images)
    reference.run_steps(2)
    compiled.run_steps(2)
    _, labels = reference.batch(reference.epoch_step)
    checks = check_compiled_step(3, compiled, reference.model, labels)
    assert len(labels) == 1 and compiled.epoch == 1  # the step completed the epoch
    assert [c.op for c in checks if not c.passed] == []


@pytest.mark.parametrize("batch", [7, 128])
def test_the_compiled_loop_gives_the_same_bits_every_time(batch):
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=(32, 16), lr=0.05)
    runs = [xpnet.Trainer("numba", data, config) for _ in range(2)]
    numpy.testing.assert_array_equal(*(run.run_steps() for run in runs))
    for got, expected in zip(*(run.model.parameters() for run in runs)):
        numpy.testing.assert_array_equal(got.value, expected.value)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_gather_from_uint8_pixels_gives_mlp_normalizes_bits_for_every_pixel_value(dtype):
    model = xpnet.MLP(xpnet.get_backend("numpy"), [784, 10], dtype=dtype, mean=33.39513, std=78.6662)
    pixels = numpy.random.default_rng(0).integers(0, 256, (40, 784), dtype=numpy.uint8)
    pixels[:, :256] = numpy.arange(256)
    rows, out = numpy.random.default_rng(1).permutation(40), numpy.empty((40, 784), dtype)
    scalar = model.dtype.type
    take_normalized_rows(pixels, rows, scalar(model.mean), scalar(model.std), out)
    numpy.testing.assert_array_equal(out, model.normalize(pixels[rows]))


# One shape: the loop compiles afresh for each (rows, dtype, layout), and the gather's bits in
# both dtypes are the test above's.
@pytest.mark.parametrize("dtype, batch", [("float32", 7), pytest.param("float64", 128, marks=pytest.mark.slow)])
def test_the_loop_trains_from_the_uint8_images_as_from_the_normalised_rows(dtype, batch):
    """The trainer hands the loop the images as loaded, which it normalises as it gathers them (a
    quarter of the bytes to fetch): the bits of the loop gathering the trainer's normalised rows."""
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=(32, 16), lr=0.05, dtype=dtype)
    from_pixels = xpnet.Trainer("numba", data, config)
    from_rows = with_layout(xpnet.Trainer("numba", data, config), None, images=None)
    assert from_pixels.compiled_steps.source.rows.dtype == numpy.uint8
    assert from_rows.compiled_steps.source.rows is from_rows.train_x
    numpy.testing.assert_array_equal(from_pixels.run_steps(), from_rows.run_steps())
    for got, expected in zip(from_pixels.model.parameters(), from_rows.model.parameters()):
        numpy.testing.assert_array_equal(got.value, expected.value)


def test_images_that_do_not_match_the_rows_are_refused():
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=300), xpnet.TrainConfig(batch_size=7))
    data = TrainingData(trainer.train_x, trainer.train_y, numpy.zeros((299, 28, 28), numpy.uint8))
    with pytest.raises(xpnet.ArgumentError, match=r"the images hold \(299, 784\) pixels where the rows are"):
        numba_steps.CompiledLoop(trainer.model, trainer.optimizer, data, 7)


class Progress:
    def __init__(self):
        self.updates = []

    def update(self, n=1):
        self.updates.append(n)


@pytest.mark.parametrize(
    "step_seconds, may_grow, chunks",
    [
        (10e-3, True, [5] * 20),
        (2.5e-3, True, [5] + [8] * 11 + [7]),
        (1e-3, True, [5] + [16] * 5 + [15]),
        (1e-3, False, [5] * 20),
    ],
)
def test_a_compiled_epoch_runs_in_chunks_that_move_the_progress_bar_and_grow_where_steps_are_quick(
    monkeypatch, step_seconds, may_grow, chunks
):
    """A twentieth of the epoch at first (Ctrl-C waits no longer than a chunk); then, on the host,
    as many steps as fit in CHUNK_SECONDS (20 ms) at the pace of the last chunk, a sixth
    (FEWEST_CHUNKS) of the epoch at most, never fewer. Not where the steps fix their chunks
    (CuPy's graphs, one captured per length). Steps cost step_seconds of a fake clock."""
    from types import SimpleNamespace

    from xpnet.nn import train

    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=4000), xpnet.TrainConfig(batch_size=40))
    clock, run = [0.0], trainer.compiled_steps.run
    monkeypatch.setattr(trainer.compiled_steps, "chunks_may_grow", may_grow)

    def run_on_the_clock(order, first, n, *args):
        clock[0] += n * step_seconds
        return run(order, first, n, *args)

    monkeypatch.setattr(train, "CHUNK_SECONDS", 0.02)
    monkeypatch.setattr(train, "FEWEST_CHUNKS", 6)
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(trainer.compiled_steps, "run", run_on_the_clock)
    progress = Progress()
    trainer.run_steps(progress=progress)
    assert trainer.steps_per_epoch == 100 and progress.updates == chunks


def test_without_numpys_blas_numba_falls_back_to_the_reference_loop(monkeypatch):
    monkeypatch.setattr(numba_steps, "BLAS", None)
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=256), xpnet.TrainConfig(batch_size=64))
    assert trainer.compiled_steps is None and numpy.isfinite(trainer.run_steps()).all()


LOAD_LOOP = """
import sys
import xpnet
from xpnet.backends import numba_steps
from xpnet.data.synthetic import synthetic_splits

numba_steps.train_steps, numba_steps.count_correct_rows = numba_steps._loop_over(sys.argv[1])
loop = numba_steps.train_steps
trainer = xpnet.Trainer("numba", synthetic_splits(n_train=64), xpnet.TrainConfig(batch_size=32))
trainer.compiled_steps.prepare(trainer.step_losses)
print(sum(loop.stats.cache_hits.values()), sum(loop.stats.cache_misses.values()))
"""


@pytest.mark.slow  # 14 s: compiles the loop afresh twice
def test_the_loop_loads_from_the_disk_cache_and_compiles_afresh_when_the_kernels_change(tmp_path):
    """_loop_over's digest stands for the files whose kernels the loop inlines: the same digest
    loads the cached loop, another one compiles it again (as an edit of any of them would)."""

    def hits_and_misses(kernels_digest):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
        command = [sys.executable, "-c", LOAD_LOOP, kernels_digest]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()

    assert hits_and_misses("kernels as they were") == ["0", "1"]
    assert hits_and_misses("kernels as they were") == ["1", "0"]
    assert hits_and_misses("kernels after an edit") == ["0", "1"]


two_cores = pytest.mark.skipif(xpnet.threads.usable_cores() < 2, reason="one core here: no second thread to split onto")


@two_cores
@pytest.mark.parametrize("options", ["plain", "nesterov-decay-cosine"])
def test_split_steps_give_the_same_bits_on_one_thread_or_two(options):
    """From numba_steps.SPLIT_FROM rows a step's work is cut in two parts, run on two threads
    of the loop's own at a count of two and one after the other at one: the same sums, so the
    same bits, where BLAS's own threads would round differently at each count."""
    data = synthetic_splits(n_train=1000)
    config = xpnet.TrainConfig(batch_size=numba_steps.SPLIT_FROM, hidden=(32, 16), lr=0.05, **OPTIONS[options])
    runs = [xpnet.Trainer("numba", data, config, threads=count) for count in (1, 2)]
    assert [run.compiled_steps.split_threads(run.blas_threads) for run in runs] == [False, True]
    assert [run.compiled_steps.blas_threads(run.blas_threads) for run in runs] == [1, 1]
    numpy.testing.assert_array_equal(*(run.run_steps() for run in runs))
    for got, expected in zip(*(run.model.parameters() for run in runs)):
        numpy.testing.assert_array_equal(got.value, expected.value)


def test_below_split_from_rows_a_step_is_one_part_on_blas_threads():
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=500), xpnet.TrainConfig(batch_size=64), threads=2)
    steps = trainer.compiled_steps
    assert steps.parts == 1 and not steps.split_threads(2) and steps.blas_threads(2) == 2


@two_cores
def test_the_loops_second_thread_ends_with_its_trainer():
    import gc
    import threading

    def helpers():
        return [thread for thread in threading.enumerate() if thread.name == "xpnet-steps"]

    before = set(helpers())
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=512), xpnet.TrainConfig(batch_size=256), threads=2)
    trainer.run_steps()
    (helper,) = set(helpers()) - before
    del trainer
    gc.collect()
    helper.join(timeout=5)
    assert not helper.is_alive()


@two_cores
def test_split_steps_count_the_correct_rows_on_their_threads_as_the_reference_pass_does():
    """Validation beside split steps runs on the loop's two threads (one BLAS thread each) and
    counts what the layers' forward pass and the backend's count do; it declines arrays it was
    not made for, and counts where the steps are not split, leaving them to the reference pass."""
    data = synthetic_splits(n_train=2000, n_validation=5000)
    config = xpnet.TrainConfig(batch_size=256, hidden=(64,), dtype="float64", lr=0.05)
    trainer = xpnet.Trainer("numba", data, config, threads=2)
    trainer.run_steps()
    steps, x, y = trainer.compiled_steps, trainer.val_x, trainer.val_y
    reference = trainer.accuracy(x, y, batch_size=2048) * len(y)
    assert 0 < reference < len(y)  # a partly trained model: the count can be wrong both ways
    assert steps.count_correct(x, y, 2) == reference
    assert steps.count_correct(x[:4999], y[:4999], 2) == trainer.accuracy(x[:4999], y[:4999], batch_size=64) * 4999
    assert steps.count_correct(x, y, 1) is None
    assert steps.count_correct(x.astype("float32"), y, 2) is None and steps.count_correct(x[:, :-1], y, 2) is None
    assert steps.count_correct(numpy.asfortranarray(x), y, 2) is None and steps.count_correct(x, y[:-1], 2) is None
    assert trainer.accuracy(x, y) * len(y) == reference


def interrupted_around_this_threads_call(monkeypatch, before):
    """The loop's run, with Ctrl-C (a KeyboardInterrupt) raised just before this thread's own
    compiled call of the split steps, or just after it, while the second thread runs its own."""
    train_steps = numba_steps.train_steps

    def call(*args):
        split = args[1]
        if split.part == 0 and split.threads == 2 and before:
            raise KeyboardInterrupt
        taken = train_steps(*args)
        if split.part == 0 and split.threads == 2:
            raise KeyboardInterrupt
        return taken

    monkeypatch.setattr(numba_steps, "train_steps", call)


@two_cores
@pytest.mark.parametrize("before", [True, False])
def test_ctrl_c_around_this_threads_call_frees_the_second_thread_and_the_run_goes_on_bit_for_bit(monkeypatch, before):
    """Split steps on two threads meet at barriers. Ctrl-C before this thread's own call leaves the
    second thread waiting at the first barrier: run marks the call given up, the second thread
    leaves it, and no weight has moved (updates come after that barrier). Ctrl-C after it finds
    the steps taken. Either way the run then goes on with the bits of an uninterrupted one."""
    data = synthetic_splits(n_train=1300)
    config = xpnet.TrainConfig(batch_size=numba_steps.SPLIT_FROM, hidden=(32,), lr=0.05, momentum=0.9)
    whole, interrupted = (xpnet.Trainer("numba", data, config, threads=2) for _ in range(2))
    n, order = whole.steps_per_epoch, numpy.random.default_rng(1).permutation(1300)
    lrs, losses = numpy.full(n, 0.05), [numpy.zeros(n, "float32") for _ in range(2)]
    whole.compiled_steps.run(order, 0, n, lrs, losses[0], threads=1)
    steps, before_state = interrupted.compiled_steps, [p.value.copy() for p in interrupted.model.parameters()]
    with monkeypatch.context() as patch:
        interrupted_around_this_threads_call(patch, before)
        with pytest.raises(KeyboardInterrupt):
            steps.run(order, 0, 2, lrs[:2], losses[1], threads=2)
    if before:  # nothing taken: the weights as they were, the steps still to take
        for got, expected in zip(interrupted.model.parameters(), before_state):
            numpy.testing.assert_array_equal(got.value, expected)
        assert not losses[1].any()
        steps.run(order, 0, 2, lrs[:2], losses[1], threads=2)
    steps.run(order, 2, n - 2, lrs[2:], losses[1], threads=2)
    numpy.testing.assert_array_equal(*losses)
    for got, expected in zip(interrupted.model.parameters(), whole.model.parameters()):
        numpy.testing.assert_array_equal(got.value, expected.value)


def test_every_kernel_that_inlines_another_files_is_keyed_by_their_digest():
    """Numba keys a function's disk cache by its own file: a cached kernel that calls another
    file's kernels would keep the old ones after an edit of that file (seen: a new activation
    code treated as none by a stale forward pass). So numba_steps and numba_rules define no
    cached kernel of their own outside _loop_over's closure, whose key holds the files' digest."""
    from numba.core.caching import NullCache

    from xpnet.backends import numba_rules

    for module in (numba_steps, numba_rules):
        own = [
            name
            for name, value in vars(module).items()
            if hasattr(value, "py_func")
            and value.py_func.__module__ == module.__name__
            and not value.py_func.__qualname__.startswith("_loop_over.")  # the closures the digest keys
        ]
        cached = [name for name in own if not isinstance(getattr(module, name)._cache, NullCache)]
        assert cached == [], f"{module.__name__} caches {cached} by its own file alone"
