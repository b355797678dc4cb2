"""The benchmark machinery: honest timing, the --quick run, JSON round trip, bad flags."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import xpnet.bench
import xpnet.bench_report
from xpnet.backends import get_backend
from xpnet.backends.numpy_backend import NumpyBackend
from xpnet.bench import (
    OPENBLAS_SETTLE_SECONDS,
    Contender,
    Result,
    StepRule,
    backend_contender,
    floor_contender,
    measure,
    time_interleaved,
)
from xpnet.bench_report import SCHEMA, epoch_milliseconds, load_results, rows, run_report
from xpnet.cli import main
from xpnet.data.synthetic import synthetic_splits


def test_every_clock_read_follows_a_synchronize():
    events = []
    contender = Contender("probe", lambda: events.append("epoch"), lambda: events.append("sync"), 1)
    original = time.perf_counter

    def clock():
        events.append("clock")
        return original()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "perf_counter", clock)
        time_interleaved([contender], repeats=2)
    timed = events[2:]  # after the warm-up epoch and its synchronize
    assert timed == ["sync", "clock", "epoch", "sync", "clock"] * 2


def tenths_clock(events):
    """A stand-in for time.perf_counter: each read is 0.1 s after the last, and logged in events."""
    now = [0.0]

    def clock():
        now[0] += 0.1
        events.append("clock")
        return now[0]

    return clock


def test_after_a_contender_whose_threads_keep_spinning_the_next_runs_untimed_first():
    """A peer's thread pool slows whatever runs right after it (JAX's: a floor epoch at half
    speed), so the next contender runs untimed for settle_seconds before its clock starts."""
    events = []
    spinning = Contender("jax-like", lambda: events.append("spinning"), lambda: None, 1, settle_seconds=0.25)
    quiet = Contender("numba-like", lambda: events.append("quiet"), lambda: None, 1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "perf_counter", tenths_clock(events))
        seconds = time_interleaved([spinning, quiet], repeats=1)
    warm_up = ["spinning", "quiet"]
    spinning_timed = ["clock", "spinning", "clock"]  # it follows quiet: no lead-in
    quiet_lead_in = ["clock", "clock", "quiet", "clock", "quiet", "clock"]  # 0.1 s, 0.2 s run; at 0.3 s it stops
    quiet_timed = ["clock", "quiet", "clock"]
    assert events == warm_up + spinning_timed + quiet_lead_in + quiet_timed
    assert seconds == [[pytest.approx(0.1)], [pytest.approx(0.1)]]


def test_a_gpu_contender_runs_untimed_before_each_of_its_timings():
    """A GPU idles at low clocks while the CPU rows run, and one epoch is too short to ramp them:
    each GPU timing follows GPU_WARM_UP_SECONDS of its own untimed epochs; a CPU one's does not."""
    events = []
    cpu = Contender("numba-like", lambda: events.append("cpu"), lambda: None, 1)
    gpu = Contender("cupy-like", lambda: events.append("gpu"), lambda: None, 1, gpu=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "perf_counter", tenths_clock(events))
        patch.setattr(xpnet.bench, "GPU_WARM_UP_SECONDS", 0.25)
        time_interleaved([cpu, gpu], repeats=2)
    warm_up = ["cpu", "gpu"]
    cpu_timed = ["clock", "cpu", "clock"]
    gpu_lead_in = ["clock", "clock", "gpu", "clock", "gpu", "clock"]  # 0.1 s, 0.2 s run; at 0.3 s it stops
    gpu_timed = ["clock", "gpu", "clock"]
    assert events == warm_up + (cpu_timed + gpu_lead_in + gpu_timed) * 2


def test_contenders_on_numpys_blas_are_followed_by_a_settling_lead_in():
    """OpenBLAS's second thread spins for about 0.11 s after a product: a peer with threads of
    its own (JAX's, torch's) timed next would share a core with it."""
    splits = synthetic_splits(n_train=256, n_validation=4, n_test=4)
    assert floor_contender(16).settle_seconds == OPENBLAS_SETTLE_SECONDS
    assert backend_contender(NumpyBackend(), 16, splits=splits).settle_seconds == OPENBLAS_SETTLE_SECONDS


class SlowCompile(NumpyBackend):
    prepare_calls = 0

    def prepare(self, dtype):
        SlowCompile.prepare_calls += 1
        time.sleep(0.5)
        return 0.5


def test_compile_time_is_reported_apart_and_never_timed():
    backend = SlowCompile()
    contender = backend_contender(backend, 512, splits=synthetic_splits(n_train=2048))
    assert contender.compile_seconds == 0.5 and SlowCompile.prepare_calls == 1
    (seconds,) = time_interleaved([contender], repeats=2)
    assert SlowCompile.prepare_calls == 1  # timing never compiles
    assert all(s < 0.5 for s in seconds)  # four steps of 512 take far less than the sleep


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_a_rule_trains_every_row_with_its_optimizer_and_activation_and_names_it(name):
    """Adam's rows run the reference loop (the compiled paths decline Adam), so numba has no
    '(op by op)' twin; tanh's keep the compiled loop."""
    splits = synthetic_splits(n_train=1024)
    for rule, compiled in ((StepRule("adam", "tanh"), False), (StepRule("sgd", "tanh"), name == "numba")):
        contender = backend_contender(get_backend(name), 512, splits=splits, rule=rule)
        trainer = contender.run_epoch.__self__
        assert (trainer.config.optimizer, trainer.config.lr, trainer.model.activation) == (
            rule.optimizer, rule.lr(512), "tanh"
        )  # fmt: skip
        assert contender.name == f"{name}{rule.label()}" and contender.extra["compiled"] is compiled
    assert StepRule("adam", "tanh").label() == " [adam, tanh]" and StepRule().label() == ""
    assert StepRule().lr(512) == pytest.approx(0.0512) and StepRule("adam").lr(512) == 1e-3


def test_a_rules_rows_keep_their_numpy_ratio_and_show_their_names_in_the_console(monkeypatch, capsys):
    results = [
        Result("numpy [adam]", 128, (200,), "float32", 100.0, (90.0, 110.0)),
        Result("numba [adam]", 128, (200,), "float32", 150.0, (140.0, 160.0)),
    ]
    assert [row[6] for row in rows(results)] == ["1.00", "1.50"]
    monkeypatch.setattr(xpnet.bench_report, "collect", lambda *args: results)
    assert run_report([], [128], [(200,)], "float32", 1, (), None, None, 1, rule=StepRule("adam")) == 0
    out = capsys.readouterr().out
    assert "numba [adam]" in out and "sgd" not in out and "adam and relu" in out


@pytest.mark.slow  # 15 s: a whole quick bench, every contender
def test_quick_bench_writes_json_that_round_trips_markdown_and_a_plot(tmp_path, capsys):
    json_path, markdown_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    assert (
        main(
            [
                "bench",
                "--quick",
                "--no-torch",
                "--json",
                str(json_path),
                "--markdown",
                str(markdown_path),
                "--plot",
                str(plot_path),
            ]
        )
        == 0
    )
    document = json.loads(json_path.read_text())
    assert document["schema"] == SCHEMA and document["machine"]["cpus"] >= 1
    results = load_results(json_path)
    assert {(r.name, r.batch_size) for r in results} >= {
        (name, batch)
        for name in ("numpy", "numba", "numba (op by op)", "floor (numpy matmuls)")
        for batch in (128, 512)
    }
    for r in results:
        assert r.samples_per_second > 0 and r.spread[0] <= r.samples_per_second <= r.spread[1]
        if r.name == "numba":
            assert r.compile_seconds > 0
            assert r.extra["weight_rel_diff"] < 1e-4  # float32 after 3 steps against float64
    assert [r.to_json() for r in results] == document["results"]
    assert "| numba | 200 | 512 |" in markdown_path.read_text()
    assert "samples/s" in capsys.readouterr().out
    Image = pytest.importorskip("PIL.Image", reason="opening the PNG needs Pillow (in the test extras)")
    with Image.open(plot_path) as image:
        assert image.format == "PNG" and image.size[0] >= 400


@pytest.mark.parametrize("args", [["--backends", "tpu"], ["--batch-sizes", "0"], ["--batch-sizes", ""], ["--hidden"]])
def test_bad_flags_exit_2(args, capsys):
    assert main(["bench", *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_pytest_benchmark_suite_runs():
    """bench/ is not collected with the tests; run a slice of it untimed so that it cannot rot."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    command = [sys.executable, "-m", "pytest", str(bench), "--benchmark-disable", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run([*command, "-k", "64 and float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("samples_per_second", "text"),
    [(5_460_595, "9.16"), (1_847_477, "27.1"), (500_000, "100"), (480_368, "104"), (5_000, "10,000")],
)
def test_the_epoch_column_is_an_mnist_epoch_at_the_rows_rate(samples_per_second, text):
    assert epoch_milliseconds(samples_per_second) == text


def test_a_failing_peer_loses_its_row_not_the_run_and_a_failing_backend_raises():
    def fails():
        raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten\nmore detail")

    said = []
    working = Contender("works", lambda: None, lambda: None, n_samples=100)
    broken_peer = Contender("torch compile reduce-overhead (cuda)", fails, lambda: None, n_samples=100, peer=True)
    results = measure([working, broken_peer], 16, (200,), "float32", repeats=1, log=said.append)
    assert [r.name for r in results] == ["works"]
    assert said == [
        "torch compile reduce-overhead (cuda) failed (RuntimeError: accessing tensor output of CUDAGraphs "
        "that has been overwritten): its row left out"
    ]
    with pytest.raises(RuntimeError, match="overwritten"):
        measure([Contender("cupy", fails, lambda: None, n_samples=100)], 16, (200,), "float32", repeats=1)


def test_measure_runs_each_contender_one_untimed_epoch_then_one_a_round():
    """The epoch that checks a contender runs is its warm-up: a peer's epoch can take seconds
    (torch.compile at batch 1: 15 s), so it does not run a second one before the rounds."""
    epochs = {"backend": 0, "peer": 0}

    def contender(name, peer):
        count = lambda: epochs.__setitem__(name, epochs[name] + 1)  # noqa: E731
        return Contender(name, count, lambda: None, 100, host_arrays=False, peer=peer)

    measure([contender("backend", False), contender("peer", True)], 16, (200,), "float32", repeats=3, log=print)
    assert epochs == {"backend": 1 + 3, "peer": 1 + 3}
