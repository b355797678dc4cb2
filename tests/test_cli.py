"""The command line as a user meets it: exit codes and one-line errors, in a real process."""

import subprocess
import sys

import pytest


def run_xpnet(*args, env=None):
    return subprocess.run([sys.executable, "-m", "xpnet", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--backend", "tensorflow"], "unknown backend 'tensorflow': choose one of numpy, numba, cupy"),
        (["train", "--epochs", "-1"], "epochs must be an integer >= 1, got -1"),
        (["train", "--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["train", "--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
        (["train", "--lr", "nan"], "the learning rate must be a finite number above 0, got nan"),
        (["train", "--lr", "fast"], "expected a number, got 'fast'"),
        (["train", "--momentum", "2"], "momentum must be in [0, 1), got 2.0"),
        (["train", "--nesterov"], "Nesterov momentum needs a momentum above 0"),
        (["train", "--hidden", "200,x"], "write sizes like"),
        (["train", "--dtype", "float16"], "invalid choice"),
        (["train", "--data-dir", "/nonexistent/mnist"], "data directory /nonexistent/mnist does not exist"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = run_xpnet(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xpnet: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_train_prints_epochs_and_test_accuracy(mnist_dir):
    result = run_xpnet("train", "--epochs", "1", "--data-dir", str(mnist_dir))
    assert result.returncode == 0, result.stderr
    assert "Epoch 1 - Cost: " in result.stdout and "samples/s" in result.stdout
    accuracy = float(result.stdout.split("Test accuracy: ")[1].split()[0])
    assert accuracy > 0.9


def test_a_batch_larger_than_the_training_set_is_said_once(small_data_dir):
    result = run_xpnet("train", "--epochs", "2", "--batch-size", "1000000", "--data-dir", str(small_data_dir))
    assert result.returncode == 0, result.stderr
    note = "Batch size 1,000,000 is more than the 2,048 training images: each step takes them all"
    assert result.stdout.count(note) == 1 and "Epoch 2 - Cost: " in result.stdout
