"""Dropout: Philox4x32-10 against Random123's published answers, the same masks on every backend,
the kept fraction within binomial bounds, the gradient, evaluation without it, and its settings."""

import math
import re

import numpy
import pytest

import xpnet
from xpnet.backends import get_backend, numba_kernels, philox
from xpnet.backends.philox import Draw
from xpnet.data.synthetic import synthetic_splits
from xpnet.errors import ArgumentError, ConfigError
from xpnet.nn.layers import Dropout
from xpnet.nn.loss import SoftmaxCrossEntropy
from xpnet.nn.model import MLP

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, the four words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_gives_random123s_known_answers_in_numpy_and_numba(counter, key, expected):
    assert philox.philox4x32([[word] for word in counter], key)[:, 0].tolist() == list(expected)
    words = numba_kernels.philox(*map(numpy.uint64, counter), *map(numpy.uint64, key))
    assert [int(word) for word in words] == list(expected)


def test_words_number_elements_by_counter_and_lane():
    draw = Draw(seed=2**40 + 7, epoch=3, step=11, layer=2)
    blocks = philox.philox4x32([[0, 1], [11, 11], [2, 2], [3, 3]], (7, 2**8))
    assert philox.words(draw, 7).tolist() == [*blocks[:, 0], *blocks[:, 1][:3]]


def inputs(shape, dtype, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (128, 200)], ids=["one", "odd", "layer"])
def test_every_backend_draws_the_reference_masks_bit_for_bit(backend, dtype, shape):
    """A mask is a function of (seed, epoch, step, layer) and the element alone: the NumPy
    reference's words, kept where >= floor(p * 2**32), scaled by 1 / (1 - p) rounded to dtype."""
    x, p, draw = inputs(shape, dtype), 0.3, Draw(seed=5, epoch=2, step=17, layer=1)
    keep = philox.words(draw, x.size).reshape(shape) >= math.floor(p * 2**32)
    scale = numpy.dtype(dtype).type(1 / (1 - p))
    y, mask = backend.dropout(backend.asarray(x), p, draw)
    assert numpy.array_equal(backend.to_numpy(mask), numpy.where(keep, scale, 0).astype(dtype))
    assert numpy.array_equal(backend.to_numpy(y), x * numpy.where(keep, scale, 0).astype(dtype))
    grad = inputs(shape, dtype, seed=1)
    grad_x = backend.to_numpy(backend.dropout_backward(backend.asarray(grad), mask))
    assert numpy.array_equal(grad_x, grad * numpy.where(keep, scale, 0).astype(dtype))


def test_a_strided_view_is_numbered_as_its_c_order_copy(backend):
    x = inputs((13, 8), "float32")
    draw = Draw(1, 0, 0)
    strided = backend.dropout(backend.asarray(x).T, 0.5, draw)[1]
    copied = backend.dropout(backend.asarray(numpy.ascontiguousarray(x.T)), 0.5, draw)[1]
    assert numpy.array_equal(backend.to_numpy(strided), backend.to_numpy(copied))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_binomial_and_draws_are_independent(p):
    """Over a million elements the kept count lies within 6 standard deviations of its mean
    (a chance of 2e-9 for a good generator), and two draws that differ in one counter word
    (the step, the layer, the epoch, the seed) agree where independent masks would."""
    n, backend = 1_000_000, get_backend("numba")
    x = numpy.ones(n, numpy.float32)
    keep = philox.keep_threshold(p)
    kept = 1 - keep / 2**32  # the exact probability of keeping an element
    base = Draw(seed=3, epoch=1, step=4, layer=0)
    mask = backend.dropout(x, p, base)[1] != 0
    assert abs(mask.sum() - n * kept) <= 6 * math.sqrt(n * kept * (1 - kept))
    same = kept**2 + (1 - kept) ** 2  # the chance that two independent masks agree at an element
    for other in (base._replace(step=5), base._replace(layer=1), base._replace(epoch=2), base._replace(seed=4)):
        agree = (backend.dropout(x, p, other)[1] != 0) == mask
        assert abs(agree.sum() - n * same) <= 6 * math.sqrt(n * same * (1 - same)), other


def test_dropout_with_no_probability_keeps_every_element():
    x = inputs((5, 9), "float32")
    y, mask = get_backend("numpy").dropout(x, 0.0, Draw(0, 0, 0))
    assert numpy.array_equal(y, x) and numpy.all(mask == 1)


def test_the_gradient_through_dropout_matches_finite_differences(backend):
    """With a fixed draw the network is a plain function of its weights: its backward pass (the
    mask on the way back) against central differences, in float64."""
    from tests.test_gradients import numeric_gradient, relative_error

    rng = numpy.random.default_rng(4)
    model = MLP(backend, [6, 5, 4, 3], dtype="float64", rng=rng, activation="tanh", dropout=0.4)
    x = backend.asarray(rng.standard_normal((8, 6)))
    labels = backend.asarray(rng.integers(0, 3, 8))
    loss_fn, draw = SoftmaxCrossEntropy(backend), Draw(seed=0, epoch=0, step=1)

    def loss():
        return float(backend.to_numpy(loss_fn.forward(model.forward(x, draw), labels)))

    loss()
    masks = [backend.to_numpy(layer.mask) for layer in model.net.layers if isinstance(layer, Dropout)]
    assert len(masks) == 2 and all(0 < (m == 0).mean() < 1 for m in masks)  # each drops some, not all
    model.backward(loss_fn.backward())
    analytic = [backend.to_numpy(p.grad).copy() for p in model.parameters()]
    for grad, p in zip(analytic, model.parameters()):
        assert relative_error(grad, numeric_gradient(backend, loss, p.value)) < 1e-6


def test_evaluation_and_prediction_never_drop():
    """A model with dropout evaluates as the same weights without it, every time, and a saved
    model is built without its Dropout layers (a checkpoint records no dropout to predict with)."""
    data = synthetic_splits(n_train=400)
    config = xpnet.TrainConfig(batch_size=50, hidden=(32,), lr=0.05, dropout=0.5)
    trainer = xpnet.Trainer("numpy", data, config)
    trainer.run_steps(4)
    plain = MLP(trainer.backend, trainer.model.sizes, mean=trainer.model.mean, std=trainer.model.std)
    plain.load_params([p.value for p in trainer.model.parameters()])
    x = trainer.val_x
    logits = trainer.model.forward(x).copy()  # a copy: forward returns the layer's reused buffer
    assert numpy.array_equal(logits, trainer.model.forward(x)) and numpy.array_equal(logits, plain.forward(x))
    assert trainer.accuracy(trainer.val_x, trainer.val_y) == trainer.accuracy(trainer.val_x, trainer.val_y)
    trained = trainer.model.forward(x, Draw(0, 0, 0))
    assert not numpy.array_equal(trained, logits)  # the training pass does drop
    assert len(MLP.from_checkpoint(trainer.state(), "numpy").net.layers) == 2


def test_each_step_draws_afresh_and_a_run_draws_the_same_on_numpy_and_numba():
    data = synthetic_splits(n_train=400)
    config = xpnet.TrainConfig(batch_size=50, hidden=(24, 16), lr=0.05, dropout=0.3, dtype="float64")
    runs = [xpnet.Trainer(name, data, config) for name in ("numpy", "numba")]
    masks = []
    for run in runs:
        run.run_steps(1)
        first = run.model.net.layers[1].mask.copy()
        run.run_steps(1)
        masks.append((first, run.model.net.layers[1].mask, run.model.net.layers[3].mask))
    (first, second, deeper), other = masks
    assert not numpy.array_equal(first, second) and first.shape == second.shape
    assert all(numpy.array_equal(a, b) for a, b in zip(masks[0], other))
    assert deeper.shape == (50, 16)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dropout": 1.0}, "dropout must be a probability in [0, 1), e.g. 0.5, got 1.0"),
        ({"dropout": -0.1}, "dropout must be a probability in [0, 1)"),
        ({"dropout": 0.5, "seed": 2**64}, "dropout's and --augment's generator is keyed by a seed below 2**64"),
    ],
)
def test_unusable_dropout_settings_are_refused_before_any_work(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        xpnet.TrainConfig(**settings)
    assert xpnet.TrainConfig(seed=2**64).dropout == 0.0  # without dropout the seed only seeds NumPy


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b, x: b.dropout(x, 1.0, Draw(0, 0, 0)), "the dropout probability p must be a number in [0, 1)"),
        (lambda b, x: b.dropout(x, True, Draw(0, 0, 0)), "the dropout probability p must be a number"),
        (lambda b, x: b.dropout(x, 0.5, (0, 0, 0, 0)), "draw must be a philox.Draw"),
        (lambda b, x: b.dropout(x, 0.5, Draw(0, -1, 0)), "a draw's epoch must be an integer in [0, 2**32)"),
        (lambda b, x: b.dropout(x, 0.5, Draw(2**64, 0, 0)), "a draw's seed must be an integer in [0, 2**64)"),
        (lambda b, x: b.dropout(x.astype("int32"), 0.5, Draw(0, 0, 0)), "x must be float32 or float64"),
        (lambda b, x: b.dropout_backward(x, x[:1]), "mask must have shape (4, 3)"),
        (lambda b, x: b.dropout(x, 0.5, Draw(0, 0, 0), mask_out=x[:, :2]), "mask_out must have shape (4, 3)"),
    ],
)
def test_bad_dropout_arguments_are_refused_alike_on_every_backend(backend, call, message):
    x = backend.asarray(numpy.ones((4, 3), numpy.float32))
    with pytest.raises(ArgumentError, match=re.escape(message)):
        call(backend, x)


def test_the_fast_paths_decline_dropout_and_the_reference_loop_trains_it():
    config = xpnet.TrainConfig(batch_size=32, hidden=(16,), dropout=0.2)
    with pytest.warns(RuntimeWarning, match="it lowers no dropout"):
        trainer = xpnet.Trainer("numba", synthetic_splits(n_train=300), config, compiled=True)
    assert trainer.compiled_steps is None and numpy.isfinite(trainer.run_steps(3)).all()
