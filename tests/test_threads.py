"""The BLAS thread policy (src/xpnet/threads.py): counts given, and auto's reading of the load."""

import numpy
import pytest
from threadpoolctl import threadpool_info

import xpnet
from tests.cuda_host import CXX, EmulatedCupyBackend
from xpnet import threads
from xpnet.data.synthetic import synthetic_splits
from xpnet.errors import ConfigError


@pytest.mark.parametrize("given, expected", [(None, None), ("auto", "auto"), ("1", 1), (1, 1)])
def test_threads_are_auto_or_a_count(given, expected):
    assert threads.check_threads(given) == expected


def test_a_count_up_to_the_usable_cores_is_taken_and_more_is_refused(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    assert threads.check_threads("4") == 4
    with pytest.raises(ConfigError, match="threads 5 is more than the 4 cores this process may use.*give 1 to 4"):
        threads.check_threads(5)


@pytest.mark.parametrize("given", ["0", "-1", "two", "1.5", ""])
def test_anything_else_is_refused(given):
    with pytest.raises(ConfigError, match="threads must be 'auto' or a whole number >= 1"):
        threads.check_threads(given)


def blas_counts():
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_a_count_limits_every_blas_library_inside_the_block():
    with threads.blas_threads(1):
        assert blas_counts() == {1}


@pytest.mark.parametrize("others, cores, expected", [(0.0, 2, 2), (0.03, 2, 2), (1.0, 2, 1), (1.9, 2, 1), (3.0, 4, 1)])
def test_auto_gives_blas_the_cores_other_processes_leave(monkeypatch, others, cores, expected):
    """The machine's busy time grows by what this process uses plus `others` cores' worth."""
    clock = {"busy": 0.0, "own": 0.0}

    def run(steps):
        clock["own"] += 0.1
        clock["busy"] += 0.1 + others * 0.1

    monkeypatch.setattr(threads, "busy_cpu_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads, "own_cpu_seconds", lambda: clock["own"])
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["own"])  # each chunk: 0.1 s of wall time
    count, measured = threads.threads_left(run, chunk=1, most=5, current=cores)
    assert count == expected and measured == pytest.approx(others)


def test_a_trainer_with_a_count_trains_under_it(monkeypatch):
    seen = []
    trainer = xpnet.Trainer("numba", synthetic_splits(n_train=512), xpnet.TrainConfig(batch_size=64), threads=1)
    run_steps = trainer.run_steps
    monkeypatch.setattr(trainer, "run_steps", lambda *a, **k: (seen.append(blas_counts()), run_steps(*a, **k))[1])
    trainer.train_epoch()
    assert seen == [{1}] and trainer.blas_threads == 1


def test_each_epochs_line_names_its_thread_count():
    lines = []
    config = xpnet.TrainConfig(batch_size=64, epochs=1)
    xpnet.Trainer("numpy", synthetic_splits(n_train=128), config, threads=1).fit(log=lines.append)
    assert lines[-2].startswith("Epoch 1 - ") and lines[-2].endswith(" samples/s, 1 thread)")
    xpnet.Trainer("numpy", synthetic_splits(n_train=128), config).fit(log=lines.append)  # no limit: no count
    assert lines[-2].startswith("Epoch 1 - ") and lines[-2].endswith(" samples/s)")


def test_the_cli_follows_the_load_and_the_library_leaves_blas_its_own_count():
    """xpnet train and bench default to auto; a Trainer to no limit, so a script's runs repeat
    bit for bit unless it asks for auto (OpenBLAS's last bits depend on the thread count).
    The counts differ in rounding only."""
    from xpnet.cli import build_parser

    assert build_parser().parse_args(["train"]).threads == threads.AUTO
    assert build_parser().parse_args(["bench"]).threads == threads.AUTO
    if threads.usable_cores() < 2:
        pytest.skip("one core: every thread count is one thread")
    rng = numpy.random.default_rng(0)
    x, W = rng.standard_normal((256, 784)).astype("float32"), rng.standard_normal((200, 784)).astype("float32")
    products = []
    for count in (1, 2):
        with threads.blas_threads(count):
            products.append(x @ W.T)
    numpy.testing.assert_allclose(products[0], products[1], rtol=1e-5, atol=1e-4)
    assert xpnet.Trainer("numpy", synthetic_splits(n_train=64)).threads is None


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
def test_an_epoch_on_a_device_backend_sets_no_blas_limit(monkeypatch):
    """A GPU backend uses no host BLAS, and a limit is not free; the emulated CuPy backend
    stands for one."""
    limits, blas_threads = [], threads.blas_threads

    def recorded(count, controller=None):
        limits.append(count)
        return blas_threads(count, controller)

    monkeypatch.setattr(threads, "blas_threads", recorded)
    for backend, limit in (("numpy", 1), (EmulatedCupyBackend(), None)):
        trainer = xpnet.Trainer(backend, synthetic_splits(n_train=128), xpnet.TrainConfig(batch_size=64), threads=1)
        limits.clear()
        trainer.train_epoch()
        assert limits == [limit]


@pytest.mark.parametrize("slow_from, checks_at", [(None, [0]), (20, [0, 22])])
def test_auto_checks_the_load_again_when_it_arrives_mid_epoch(monkeypatch, slow_from, checks_at):
    """Steps cost one unit of a fake clock, three from step `slow_from` on (another process
    arrived). The load is checked at the epoch's start and, after the first chunk three times
    slower than the one after that check, again; the checks train like the other chunks."""
    from types import SimpleNamespace

    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=2560), xpnet.TrainConfig(batch_size=64), threads="auto")
    assert (trainer.steps_per_epoch, trainer.chunk_steps) == (40, 2)
    clock = [0.0]

    def tick():
        clock[0] += 1e-6  # every read moves it, so an epoch never takes zero seconds
        return clock[0]

    run_steps, checks = trainer.run_steps, []

    def timed_run_steps(n=None, progress=None):
        first = trainer.epoch_step
        clock[0] += sum(3.0 if slow_from is not None and k >= slow_from else 1.0 for k in range(first, first + n))
        return run_steps(n, progress)

    def check(run, chunk, most, current, limit=None):
        checks.append(trainer.epoch_step)
        run(chunk), run(chunk)
        return 1, 1.0

    monkeypatch.setattr(threads, "time", SimpleNamespace(perf_counter=tick))
    monkeypatch.setattr(threads, "threads_left", check)
    monkeypatch.setattr(trainer, "run_steps", timed_run_steps)
    trainer.train_epoch()
    assert checks == checks_at
    assert trainer.epoch == 1 and trainer.epoch_step == 0 and trainer.blas_threads == 1
    assert len(trainer.history.epochs) == 1 and numpy.isfinite(trainer.history.epochs[0].loss)
