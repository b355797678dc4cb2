"""The Numba backend's compiled training loop (xpnet/backends/numba_steps.py): each op of a
compiled step within verify's one-op bounds, at any depth, dtype, batch size (1 included,
where the products are gemv) and output layout; and whole runs against the reference loop
in float64 for every optimiser option."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest

import xpnet
from tests.cuda_host import EmulatedCupyBackend
from xpnet.backends import numba_steps
from xpnet.backends.numba_backend import _take_normalized_rows
from xpnet.data.synthetic import synthetic_splits
from xpnet.verify import check_compiled_step

pytestmark = pytest.mark.skipif(numba_steps.BLAS is None, reason="NumPy's own BLAS routines were not found here")

OPTIONS = {
    "plain": {},
    "decay": {"weight_decay": 1e-3},
    "momentum": {"momentum": 0.9},
    "nesterov-decay-cosine": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "schedule": "cosine"},
}


def with_layout(trainer, feature_major):
    """The trainer with its compiled loop rebuilt to keep layer outputs feature-major or not."""
    trainer.compiled_steps = numba_steps.CompiledSteps(
        trainer.backend, trainer.model, trainer.optimizer, trainer.train_x, trainer.train_y,
        trainer.config.batch_size, feature_major=feature_major,
    )  # fmt: skip
    return trainer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("hidden", [(200,), (32, 16, 8)])
@pytest.mark.parametrize("feature_major", [False, True])
def test_each_op_of_a_compiled_step_is_within_its_bound(dtype, batch, hidden, feature_major):
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=hidden, dtype="float64", lr=0.05)
    reference = xpnet.Trainer("numpy", data, config)
    compiled = with_layout(xpnet.Trainer("numba", data, dataclasses.replace(config, dtype=dtype)), feature_major)
    for step in range(1, 4):
        _, labels = reference.batch(reference.epoch_step)
        checks = check_compiled_step(step, compiled, reference.model, labels, config.lr)
        assert len(checks) == 5 * len(hidden) + 6  # gather, loss, grad; forward, mask, grad x, W and b by layer
        failed = [(c.op, c.bound_used) for c in checks if not c.passed]
        assert not failed
        assert any(c.max_abs > 0 for c in checks)  # the products do round: the bounds are being used
        reference.run_steps(1)


@pytest.mark.parametrize("batch", [7, 128])
@pytest.mark.parametrize("feature_major", [False, True])
def test_an_epochs_last_batch_of_one_row_is_within_its_bound(batch, feature_major):
    data = synthetic_splits(n_train=2 * batch + 1)  # the last batch is one row: every product a gemv-shaped edge
    config = xpnet.TrainConfig(batch_size=batch, hidden=(32, 16), dtype="float64", lr=0.05)
    reference = xpnet.Trainer("numpy", data, config)
    compiled = with_layout(xpnet.Trainer("numba", data, dataclasses.replace(config, dtype="float32")), feature_major)
    reference.run_steps(2)
    compiled.run_steps(2)
    _, labels = reference.batch(reference.epoch_step)
    checks = check_compiled_step(3, compiled, reference.model, labels, config.lr)
    assert len(labels) == 1 and compiled.epoch == 1  # the step completed the epoch
    assert [c.op for c in checks if not c.passed] == []


@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("hidden", [(200,), (32, 16, 8)])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_compiled_runs_match_the_reference_loop_in_float64(batch, hidden, options):
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=hidden, dtype="float64", lr=0.01, **OPTIONS[options])
    compiled = xpnet.Trainer("numba", data, config)
    stepwise = xpnet.Trainer("numpy", data, config)
    assert compiled.compiled_steps is not None and stepwise.compiled_steps is None
    steps = min(30, compiled.steps_per_epoch)
    numpy.testing.assert_allclose(compiled.run_steps(steps), stepwise.run_steps(steps), rtol=1e-9, atol=0)
    for got, expected in zip(compiled.model.parameters(), stepwise.model.parameters()):
        numpy.testing.assert_allclose(got.value, expected.value, rtol=1e-9, atol=0)
    for got, expected in zip(compiled.optimizer.velocities, stepwise.optimizer.velocities):
        assert (got is None) == (expected is None)
        if got is not None:
            numpy.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
    assert compiled.optimizer.steps_taken == stepwise.optimizer.steps_taken == steps


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
    _take_normalized_rows(pixels, rows, scalar(model.mean), scalar(model.std), out)
    numpy.testing.assert_array_equal(out, model.normalize(pixels[rows]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [7, 128])
def test_the_loop_trains_from_the_uint8_images_as_from_the_normalised_rows(dtype, batch):
    """The trainer hands the loop the images as loaded, which it normalises as it gathers them (a
    quarter of the bytes to fetch): the bits of the loop gathering the trainer's normalised rows."""
    data = synthetic_splits(n_train=300)
    config = xpnet.TrainConfig(batch_size=batch, hidden=(32, 16), lr=0.05, dtype=dtype)
    from_pixels = xpnet.Trainer("numba", data, config)
    from_rows = with_layout(xpnet.Trainer("numba", data, config), None)  # made without the images
    assert from_pixels.compiled_steps.source[0].dtype == numpy.uint8
    assert from_rows.compiled_steps.source[0] is from_rows.train_x
    numpy.testing.assert_array_equal(from_pixels.run_steps(), from_rows.run_steps())
    for got, expected in zip(from_pixels.model.parameters(), from_rows.model.parameters()):
        numpy.testing.assert_array_equal(got.value, expected.value)


def test_images_that_do_not_match_the_rows_are_refused():
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=300), xpnet.TrainConfig(batch_size=7))
    args = (trainer.backend, trainer.model, trainer.optimizer, trainer.train_x, trainer.train_y, 7)
    with pytest.raises(xpnet.ArgumentError, match=r"train_images hold \(299, 784\) pixels where train_x has"):
        numba_steps.CompiledSteps(*args, train_images=numpy.zeros((299, 28, 28), numpy.uint8))


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


@pytest.mark.parametrize("backend", ["numpy", EmulatedCupyBackend.name], indirect=True)
def test_backends_without_a_compiled_loop_run_the_reference_one(backend):
    trainer = xpnet.Trainer(backend, synthetic_splits(n_train=256), xpnet.TrainConfig(batch_size=64))
    assert trainer.compiled_steps is None
    assert numpy.isfinite(trainer.run_steps()).all()


def test_without_numpys_blas_numba_falls_back_to_the_reference_loop(monkeypatch):
    monkeypatch.setattr(numba_steps, "BLAS", None)
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=256), xpnet.TrainConfig(batch_size=64))
    assert trainer.compiled_steps is None and numpy.isfinite(trainer.run_steps()).all()


LOAD_LOOP = """
import sys
import xpnet
from xpnet.backends import numba_steps
from xpnet.data.synthetic import synthetic_splits

numba_steps._train_steps, numba_steps._count_correct_rows = numba_steps._loop_over(sys.argv[1])
loop = numba_steps._train_steps
trainer = xpnet.Trainer("numba", synthetic_splits(n_train=64), xpnet.TrainConfig(batch_size=32))
trainer.compiled_steps.prepare(trainer.step_losses)
print(sum(loop.stats.cache_hits.values()), sum(loop.stats.cache_misses.values()))
"""


def test_the_loop_loads_from_the_disk_cache_and_compiles_afresh_when_the_kernels_change(tmp_path):
    """_loop_over's digest stands for numba_backend.py and numba_sync.py, whose kernels the loop
    inlines: the same digest loads the cached loop, another one compiles it again (as an edit of
    either file would)."""

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


def split_pair_and_one_threads_steps(n):
    """Two trainers whose steps split on two threads, an order and n steps' rates, the losses of
    each, and the first trainer's n steps taken on one thread: the bits the other must give."""
    data = synthetic_splits(n_train=1300)
    config = xpnet.TrainConfig(batch_size=numba_steps.SPLIT_FROM, hidden=(32,), lr=0.05)
    whole, other = (xpnet.Trainer("numba", data, config, threads=2) for _ in range(2))
    lrs, order = numpy.full(n, 0.05), numpy.random.default_rng(1).permutation(1300)
    losses = [numpy.zeros(n, "float32") for _ in range(2)]
    other.compiled_steps.prepare(losses[1])
    whole.compiled_steps.run(order, 0, n, lrs, losses[0], threads=1)
    return whole, other, order, lrs, losses


def assert_same_bits(losses, trainer, reference):
    numpy.testing.assert_array_equal(*losses)
    for got, expected in zip(trainer.model.parameters(), reference.model.parameters()):
        numpy.testing.assert_array_equal(got.value, expected.value)


def wait_until_left(steps):
    """Whether the loop's second thread goes back to Python within 5 s (it waits milliseconds)."""
    deadline = time.perf_counter() + 5
    while steps.sync[1] != numba_steps.LEFT and time.perf_counter() < deadline:
        time.sleep(0.01)
    return steps.sync[1] == numba_steps.LEFT


@two_cores
def test_ctrl_c_before_or_after_this_threads_call_leaves_the_second_thread_free_and_the_bits_unchanged(monkeypatch):
    """The second thread takes steps only once this thread's compiled call has posted them, so a
    Ctrl-C before that call (just after the second thread was handed a new call, or where steps
    would go to the call it runs on in) takes no step and strands nothing: the second thread
    goes back to Python by itself, and a call cut off from this thread's record of it takes
    none of the next call's steps. After the call, the steps are taken. Either way the run then
    goes on with the bits of an uninterrupted one."""
    whole, interrupted, order, lrs, losses = split_pair_and_one_threads_steps(3)
    steps = interrupted.compiled_steps
    span, train_steps = numba_steps._Span, numba_steps._train_steps

    def span_then_ctrl_c(*args):  # the second thread has just been handed a new call
        handed = span(*args)
        signal.raise_signal(signal.SIGINT)
        return handed

    def ctrl_c_around_this_threads_call(before):
        def call(*args):
            if args[3] == 0 and before:
                signal.raise_signal(signal.SIGINT)
            taken = train_steps(*args)
            if args[3] == 0:
                signal.raise_signal(signal.SIGINT)
            return taken

        return call

    monkeypatch.setattr(numba_steps, "_Span", span_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # in another epoch, whose order is another
        steps.run(order[::-1].copy(), 0, 1, lrs[:1], losses[1], threads=2)
    assert losses[1][0] == 0  # no step taken; the second thread's call, cut off, waits for one
    cut_off = steps.sync
    monkeypatch.setattr(numba_steps, "_Span", span)
    monkeypatch.setattr(numba_steps, "_train_steps", ctrl_c_around_this_threads_call(before=False))
    with pytest.raises(KeyboardInterrupt):
        steps.run(order, 0, 1, lrs[:1], losses[1], threads=2)
    assert losses[1][0] == losses[0][0]  # the step was taken
    monkeypatch.setattr(numba_steps, "_train_steps", ctrl_c_around_this_threads_call(before=True))
    with pytest.raises(KeyboardInterrupt):  # the second thread runs on, waiting for step 1
        steps.run(order, 1, 1, lrs[1:2], losses[1], threads=2)
    assert losses[1][1] == 0 and wait_until_left(steps)
    monkeypatch.undo()
    steps.run(order, 1, 2, lrs[1:], losses[1], threads=2)
    assert_same_bits(losses, interrupted, whole)
    assert cut_off[1] == numba_steps.LEFT and wait_until_left(steps)


@two_cores
def test_steps_posted_once_the_second_thread_has_left_start_it_afresh(monkeypatch):
    """Where this thread comes to post its steps only after the second thread stopped waiting for
    them (held up past WAIT_ROUNDS), its call takes no step and run hands the second thread a new
    call: the steps are taken once, with the bits of one thread."""
    whole, late, order, lrs, losses = split_pair_and_one_threads_steps(2)
    steps = late.compiled_steps
    train_steps, taken = numba_steps._train_steps, []

    def after_the_second_thread_left(*args):  # this thread's first call, held up
        if args[3] == 0 and not taken:
            assert wait_until_left(steps)
        result = train_steps(*args)
        if args[3] == 0:
            taken.append(result)
        return result

    monkeypatch.setattr(numba_steps, "_train_steps", after_the_second_thread_left)
    calls = steps._job
    steps.run(order, 0, 2, lrs, losses[1], threads=2)
    assert taken == [False, True] and steps._job == calls + 2
    assert_same_bits(losses, late, whole)


@two_cores
def test_the_second_thread_runs_on_across_calls_and_any_break_in_them_gives_the_same_bits():
    """On two threads the second one's call goes on into the steps the next call from where the
    last one ended posts to it. Whatever breaks that run of calls (a pause it leaves in, a count
    of correct rows, a call on one thread, a new order) starts it afresh; the bits are those of
    the whole epochs in one call each on one thread."""
    data = synthetic_splits(n_train=1300)
    config = xpnet.TrainConfig(batch_size=numba_steps.SPLIT_FROM, hidden=(32,), lr=0.05, momentum=0.9)
    whole, chunked = (xpnet.Trainer("numba", data, config, threads=2) for _ in range(2))
    steps = chunked.compiled_steps
    n = whole.steps_per_epoch  # 11: ten whole batches and one of 20 rows
    rng = numpy.random.default_rng(1)
    lrs = rng.uniform(0.01, 0.05, n)
    losses = [numpy.empty(n, "float32") for _ in range(2)]
    steps.prepare(losses[1])  # as Trainer.fit does: no compiling between the calls
    ran_on = []
    for _ in range(2):  # two epochs, each its own order
        order = rng.permutation(1300)
        whole.compiled_steps.run(order, 0, n, lrs, losses[0], threads=1)
        calls = steps._job
        for first, size in ((0, 1), (1, 2), (3, 1)):
            steps.run(order, first, size, lrs[first : first + size], losses[1], threads=2)
        ran_on.append(steps._job == calls + 1)  # one call of the second thread took all three
        assert wait_until_left(steps)  # no more steps came
        calls = steps._job
        steps.run(order, 4, 2, lrs[4:6], losses[1], threads=2)
        steps.count_correct(chunked.val_x, chunked.val_y, threads=2)
        steps.run(order, 6, 1, lrs[6:7], losses[1], threads=2)
        steps.run(order, 7, 1, lrs[7:8], losses[1], threads=1)
        steps.run(order, 8, 3, lrs[8:], losses[1], threads=2)
        assert steps._job == calls + 4  # each break started it afresh: after the pause, the count, one thread
        assert_same_bits(losses, chunked, whole)
    # Back to back, the calls take microseconds between them, the wait milliseconds; a machine
    # that stalls this process longer than that in both epochs would be the only miss.
    assert any(ran_on)
