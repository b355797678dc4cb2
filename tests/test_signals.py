"""Stopping a training run with real signals, in child processes: Ctrl-C, a second Ctrl-C
during the save, SIGTERM; and the printed resume command, run verbatim, ending bit for bit
where an uninterrupted run ends."""

import os
import shlex
import signal
import subprocess
import sys

import numpy
import pytest

from xpnet.nn.checkpoint import load_checkpoint


def environment():
    """The data is given only by --data-dir: no XPNET_DATA_DIR for the resume to lean on."""
    return {k: v for k, v in os.environ.items() if k != "XPNET_DATA_DIR"}


# Every checkpoint save first sends this process a Ctrl-C: a second one that lands mid-save.
CTRL_C_DURING_SAVE = """
import os, signal
from xpnet.nn.checkpoint import Checkpoint
save = Checkpoint.save
def interrupted_save(self, path):
    os.kill(os.getpid(), signal.SIGINT)
    save(self, path)
Checkpoint.save = interrupted_save
"""


def train_until_epoch_1_then(signals, command, tmp_path, prelude=""):
    """Start `xpnet train` (after the prelude's code), and once epoch 1 is reported send the signals."""
    code = f"import sys\n{prelude}\nfrom xpnet.cli import main\nsys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-u", "-c", code, "train", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=environment(),
        # As at a terminal: a shell without job control (CI, nohup) starts children with
        # SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:
        if line.startswith("Epoch 1 - Cost"):
            for number in signals:
                process.send_signal(number)
            break
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def straight_run(mnist_dir, tmp_path_factory):
    """Three epochs of the seed recipe without a stop: what every resumed run must equal."""
    path = tmp_path_factory.mktemp("straight") / "straight.npz"
    command = ["train", "--epochs", "3", "--save", str(path), "--data-dir", str(mnist_dir), "--threads", "1"]
    result = subprocess.run([sys.executable, "-m", "xpnet", *command], capture_output=True, env=environment())
    assert result.returncode == 0, result.stderr
    return load_checkpoint(path)


@pytest.mark.parametrize(
    "signals, prelude, code, word",
    [
        ([signal.SIGINT], "", 130, "interrupted"),
        # The two rarer cases, 5 s each, run in the slow tier.
        pytest.param([signal.SIGINT], CTRL_C_DURING_SAVE, 130, "interrupted", marks=pytest.mark.slow),
        pytest.param([signal.SIGINT, signal.SIGINT], "", 130, "interrupted", marks=pytest.mark.slow),
        ([signal.SIGTERM], "", 143, "terminated"),
    ],
    ids=["ctrl-c", "ctrl-c-during-the-save", "two-ctrl-c-at-once", "sigterm"],
)
def test_a_stopped_run_saves_and_its_printed_command_resumes_it_exactly(
    mnist_dir, straight_run, tmp_path, signals, prelude, code, word
):
    path = tmp_path / "run.npz"
    # A fixed thread count: with auto a busy machine could steer the two runs apart.
    command = ["--epochs", "3", "--save", str(path), "--data-dir", str(mnist_dir), "--threads", "1"]
    returncode, stderr = train_until_epoch_1_then(signals, command, tmp_path, prelude)
    lines = stderr.strip().splitlines()
    assert returncode == code and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"xpnet: {word}; saved the state after epoch ")
    stopped = load_checkpoint(path)
    assert stopped.epoch in (1, 2) and stopped.epoch_step == 0  # a whole epoch, never a partial one

    resume = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert resume[:3] == [sys.executable, "-m", "xpnet"] and "--data-dir" in resume and "--save" in resume
    assert resume[resume.index("--threads") + 1] == "1"
    result = subprocess.run(resume, capture_output=True, text=True, cwd=tmp_path, env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr
    resumed = load_checkpoint(path)
    assert resumed.epoch == 3 and resumed.dataset == "mnist"
    for a, b in zip(resumed.params, straight_run.params):
        numpy.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 7 s: three trainings in processes of their own
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core here: numba's steps are not split")
def test_numbas_split_steps_stop_on_ctrl_c_and_resume_on_either_thread_count(mnist_dir, tmp_path):
    """Ctrl-C while numba's compiled loop runs its steps on two threads of its own (batch 512):
    the run saves its last whole epoch, and resumed on one thread ends as a straight run on two."""
    common = ["--backend", "numba", "--data-dir", str(mnist_dir)]
    straight, stopped = tmp_path / "straight.npz", tmp_path / "stopped.npz"
    command = [sys.executable, "-m", "xpnet", "train", *common, "--epochs", "3", "--threads", "2"]
    result = subprocess.run([*command, "--save", str(straight)], capture_output=True, env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr
    long_run = [*common, "--epochs", "30", "--threads", "2", "--save", str(stopped)]  # the stop surely lands in it
    returncode, stderr = train_until_epoch_1_then([signal.SIGINT], long_run, tmp_path)
    assert returncode == 130 and "interrupted; saved the state after epoch" in stderr, stderr
    assert load_checkpoint(stopped).epoch in (1, 2)
    resume = [sys.executable, "-m", "xpnet", "train", *common, "--epochs", "3", "--resume", str(stopped)]
    result = subprocess.run([*resume, "--threads", "1", "--save", str(stopped)], capture_output=True, env=environment())
    assert result.returncode == 0, result.stderr
    for a, b in zip(load_checkpoint(stopped).params, load_checkpoint(straight).params):
        numpy.testing.assert_array_equal(a, b)
