"""`xpnet verify` passes the real backends and catches deliberately wrong ones."""

import numpy
import pytest

from xpnet.backends import REGISTRY, numba_steps
from xpnet.backends.numba_backend import NumbaBackend
from xpnet.backends.numpy_backend import NumpyBackend
from xpnet.cli import main


class DropsOneReluGradient(NumbaBackend):
    """ReLU backward loses the gradient of one active unit, as an off-by-one in a mask would."""

    name = "drops-one-relu-gradient"

    def _linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x, activation, saved, grad_z):
        if activation == "relu":
            grad_y = grad_y.copy()
            grad_y[tuple(numpy.argwhere(saved > 0)[0])] = 0
        super()._linear_backward(x, W, grad_y, grad_W, grad_b, grad_x, activation, saved, grad_z)


class CompiledLoopWithAWrongRate(numba_steps.CompiledLoop):
    def run(self, order, first, n, lrs, losses, threads=None):
        super().run(order, first, n, lrs * 1.001, losses, threads)


class WrongCompiledPath(NumbaBackend):
    """Its ops are right; its compiled steps use a learning rate 0.1% too large."""

    name = "wrong-compiled-path"

    def compile_steps(self, model, optimizer, data, batch_size):
        return CompiledLoopWithAWrongRate(model, optimizer, data, batch_size)


class DrawsTheNextStepsMask(NumbaBackend):
    """Its dropout masks are another step's: as an off-by-one in the counter would draw."""

    name = "draws-the-next-steps-mask"

    def _dropout(self, x, threshold, scale, draw, out, mask):
        return super()._dropout(x, threshold, scale, draw._replace(step=draw.step + 1), out, mask)


class DeformsAsTheNextEpoch(NumbaBackend):
    """Its deformations are the next epoch's: as a trainer passing the wrong epoch would draw."""

    name = "deforms-as-the-next-epoch"

    def _deform_rows(self, source, rows, spec, seed, epoch, background, out):
        return super()._deform_rows(source, rows, spec, seed, epoch + 1, background, out)


class SlightlyWrongLearningRate(NumpyBackend):
    name = "slightly-wrong-learning-rate"

    def _sgd_update(self, param, grad, lr, *args):
        super()._sgd_update(param, grad, lr * 1.001, *args)


@pytest.fixture
def wrong_backends(monkeypatch):
    wrong = (DropsOneReluGradient, SlightlyWrongLearningRate, WrongCompiledPath, DrawsTheNextStepsMask)
    for cls in (*wrong, DeformsAsTheNextEpoch):
        monkeypatch.setitem(REGISTRY, cls.name, f"{__name__}:{cls.__name__}")


def checks_per_step(layers, compiled):
    """Each layer's forward, the loss and its gradient, grad W and grad b of each layer and grad x
    of all but the first, and the SGD and AdamW updates of each W and b; and for a backend that
    compiles its steps, one compiled step's gather, loss and gradient, and by layer its forward,
    ReLU mask (all but the last), grad x (all but the first) and the updates of W and b."""
    return layers + 2 + (3 * layers - 1) + 4 * layers + (3 + 5 * layers - 2 if compiled else 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_real_backends_agree(mnist_dir, dtype, capsys):
    backends, steps = ["numpy", "numba"], 3
    command = ["verify", "--backends", ",".join(backends), "--dtype", dtype, "--steps", str(steps)]
    assert main([*command, "--data-dir", str(mnist_dir)]) == 0
    expected = steps * sum(checks_per_step(layers=2, compiled=name == "numba") for name in backends)  # 784-200-10
    assert f"All {expected} checks agree: numpy, numba" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, op",
    [
        (DropsOneReluGradient.name, "layer 1 backward grad W"),
        (SlightlyWrongLearningRate.name, "layer 2 update W"),
        (WrongCompiledPath.name, "compiled layer 2 update W"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_wrong_backend_fails_naming_the_op(mnist_dir, wrong_backends, wrong, op, dtype, capsys):
    code = main(
        ["verify", "--backends", f"numba,{wrong}", "--dtype", dtype, "--steps", "2", "--data-dir", str(mnist_dir)]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert f"{wrong} disagrees first at step 1, {op}" in captured.err
    assert "numba " in captured.out and "FAIL" in captured.out


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_dropout_is_checked_mask_for_mask_and_a_wrong_counter_is_caught(mnist_dir, wrong_backends, dtype, capsys):
    """With dropout each backend's mask must equal the reference's bit for bit, and its products
    be within one-op bounds; Numba's compiled loop declines dropout, so its op-by-op checks are all."""
    command = ["verify", "--dtype", dtype, "--steps", "2", "--dropout", "0.3", "--data-dir", str(mnist_dir)]
    assert main([*command, "--backends", "numpy,numba"]) == 0
    expected = 2 * 2 * (checks_per_step(layers=2, compiled=False) + 3)  # mask, product, backward
    assert f"All {expected} checks agree: numpy, numba" in capsys.readouterr().out
    assert main([*command, "--backends", f"numba,{DrawsTheNextStepsMask.name}"]) == 1
    assert f"{DrawsTheNextStepsMask.name} disagrees first at step 1, layer 1 dropout mask" in capsys.readouterr().err


@pytest.mark.slow  # 9 s: the reference deforms 512 images a step, image by image
def test_the_deformed_batch_is_checked_and_a_wrong_draw_is_caught(mnist_dir, wrong_backends, capsys):
    command = ["verify", "--steps", "1", "--augment", "affine,elastic", "--data-dir", str(mnist_dir)]
    assert main([*command, "--backends", "numpy,numba"]) == 0
    out = capsys.readouterr().out
    expected = sum(checks_per_step(layers=2, compiled=compiled) + 1 for compiled in (False, True))  # numpy, numba
    assert "deformed batch" in out and f"All {expected} checks" in out  # numba's loop trains on deformed images
    assert main([*command, "--backends", f"numba,{DeformsAsTheNextEpoch.name}"]) == 1
    assert f"{DeformsAsTheNextEpoch.name} disagrees first at step 1, deformed batch" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main(["verify", "--backends", ","]) == 2
    assert main(["verify", "--steps", "0"]) == 2
    assert main(["verify", "--backends", "tpu"]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err
