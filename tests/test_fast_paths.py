"""The fast-path contract (src/xpnet/backends/steps.py): every compiled path runs exactly what the
reference loop runs, for the combinations of the training settings below, or declines it.

The values come from TrainConfig's declaration, so a setting added later joins by itself: both
values of a bool, each of a setting's choices, and its declared example beside its default. The
test sets only what it must (the batch sizes and depths the compiled paths treat differently, a
short run's epochs, rate and seed). Every combination of the kernels' shape (batch size, depth,
dtype) is run, each with every value of every other setting, and every two of those others'
values meet in some run (an all-pairs cover): the full product grows twofold with each new
setting, this by a few runs. In float64 a compiled run equals the
reference loop within rtol 1e-9; in float32, where its roundings differ, each op of each
compiled step is within verify's one-op bounds (src/xpnet/verify.py).
"""

import dataclasses
import itertools
import re
import warnings

import numpy
import pytest

import xpnet
from tests.cuda_host import CXX, EmulatedCupyBackend
from xpnet.backends import numba_steps, steps
from xpnet.backends.base import ACTIVATIONS, Declined
from xpnet.backends.steps import TrainingData
from xpnet.data.synthetic import synthetic_splits
from xpnet.nn import optim
from xpnet.nn.config import TrainConfig
from xpnet.nn.layers import Linear
from xpnet.nn.model import MLP
from xpnet.nn.optim import SGD
from xpnet.verify import check_compiled_step

# The optimisers both compiled paths lower (numba_rules.LOWERED, cupy_graphs.lowering_problem): the
# others are declined with a warning that names them.
LOWERED = ("sgd",)
# The activations both lower: all but those whose backward pass needs the pre-activation (gelu).
LOWERED_ACTIVATIONS = steps.OUTPUT_ACTIVATIONS
# What the test sets itself; every other setting's values come from its declaration.
SET_HERE = {
    "batch_size": (1, 7, 128),  # a gemv, a small feature-major batch, a split one
    "hidden": ((16,), (16, 12)),  # one hidden layer, and two: a layer between two others
    "epochs": (2,),
    "lr": (0.01,),
    "seed": (0,),
}
STEPS = 3


def declared_values(declared):
    if declared.name in SET_HERE:
        return SET_HERE[declared.name]
    if declared.type is bool:
        return (False, True)
    if declared.metadata["choices"] is not None:
        return declared.metadata["choices"]
    example = declared.metadata["example"]
    return (declared.default,) if example is None else (declared.default, example)


# The settings that decide the kernels' shapes: all their combinations are run.
SHAPE = ("batch_size", "hidden", "dtype")


def every_usable_config():
    """Every usable TrainConfig over the settings' values (Nesterov without momentum is not one)."""
    fields = dataclasses.fields(TrainConfig)
    for values in itertools.product(*map(declared_values, fields)):
        try:
            yield TrainConfig(**dict(zip((f.name for f in fields), values)))
        except xpnet.ConfigError:
            continue


# The other settings that take more than one value here: one value is held by every config.
OTHERS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SHAPE and len(declared_values(f)) > 1]


def parts(config):
    """A config as (its shape, then each other setting's value), the units the cover pairs."""
    return (tuple(getattr(config, name) for name in SHAPE), *(getattr(config, name) for name in OTHERS))


def pairs(config):
    values = parts(config)
    return {(i, values[i], j, values[j]) for i in range(len(values)) for j in range(i + 1, len(values))}


def combinations(usable, held_pairs):
    """Usable configs, chosen greedily until each pair of values that some usable config holds is
    held by a chosen one (the first of the most new pairs, so the same configs each run). Each
    config's pairs are bits of an int: intersecting them is then one AND (a set took 9 s)."""
    bit = {}
    masks = [sum(1 << bit.setdefault(pair, len(bit)) for pair in held) for held in held_pairs]
    uncovered, chosen = (1 << len(bit)) - 1, []
    while uncovered:
        best = max(range(len(masks)), key=lambda i: (masks[i] & uncovered).bit_count())
        chosen.append(usable[best])
        uncovered &= ~masks[best]
    return chosen


def config_id(config):
    default = TrainConfig()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return ",".join(f"{k}={v}" for k, v in changed.items() if k not in SET_HERE and v != getattr(default, k)) or "plain"


USABLE = list(every_usable_config())
USABLE_PAIRS = [pairs(config) for config in USABLE]
CONFIGS = combinations(USABLE, USABLE_PAIRS)
PATHS = ["numba", "cupy-emulated"]
DATA = synthetic_splits(n_train=300)


def compiled_backend(path):
    if path == "numba":
        if numba_steps.BLAS is None:
            pytest.skip("NumPy's own BLAS routines were not found here: numba has no compiled loop")
        return xpnet.get_backend("numba")
    if CXX is None:
        pytest.skip("no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
    return EmulatedCupyBackend()


def test_the_combinations_cover_every_shape_and_every_pair_of_values():
    for declared in dataclasses.fields(TrainConfig):
        assert len({getattr(c, declared.name) for c in CONFIGS}) == len(declared_values(declared)), declared.name
    assert len({parts(c)[0] for c in CONFIGS}) == 3 * 2 * 2  # batch sizes, depths, dtypes
    assert set().union(*map(pairs, CONFIGS)) == set().union(*USABLE_PAIRS)
    assert len(CONFIGS) < len(USABLE) / 4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "config", CONFIGS, ids=[f"{c.batch_size}-{len(c.hidden)}-{c.dtype}-{config_id(c)}" for c in CONFIGS]
)
def test_each_compiled_path_runs_what_the_reference_loop_runs(path, config):
    backend = compiled_backend(path)
    optimizer = optim.OPTIMIZERS[config.optimizer].__name__
    if config.dropout:  # declined, saying why (dropout is checked first, then the activation)
        reason = "it lowers no dropout (the reference ops draw its masks)"
    elif config.activation not in LOWERED_ACTIVATIONS:
        reason = f"it lowers the activations {', '.join(LOWERED_ACTIVATIONS)}, not {config.activation}"
    elif config.optimizer not in LOWERED:
        reason = f"it lowers the optimisers SGD, not {optimizer}"
    else:
        reason = None
    if reason is None:
        compiled = xpnet.Trainer(backend, DATA, config, compiled=True)
        assert compiled.compiled_steps is not None
    else:  # the backend's ops then run the reference loop (checked below in float64)
        with pytest.warns(RuntimeWarning, match=re.escape(f"{reason}; the reference loop")):
            compiled = xpnet.Trainer(backend, DATA, config, compiled=True)
        assert compiled.compiled_steps is None
    if config.dtype == "float64":
        reference = xpnet.Trainer("numpy", DATA, config)
        numpy.testing.assert_allclose(compiled.run_steps(STEPS), reference.run_steps(STEPS), rtol=1e-9, atol=0)
        for got, expected in zip(state(compiled), state(reference)):
            numpy.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
        assert compiled.optimizer.steps_taken == reference.optimizer.steps_taken == STEPS
        return
    if compiled.compiled_steps is None:
        return  # float32 op by op: the parity tests' bounds (tests/test_parity.py, test_optim.py)
    reference = xpnet.Trainer("numpy", DATA, dataclasses.replace(config, dtype="float64"))
    for step in range(1, STEPS + 1):
        _, labels = reference.batch(reference.epoch_step)
        checks = check_compiled_step(step, compiled, reference.model, labels)
        assert [(c.op, c.bound_used) for c in checks if not c.passed] == []
        reference.run_steps(1)


def state(trainer):
    """Host copies of the weights and every array of the optimiser's state."""
    arrays = [p.value for p in trainer.model.parameters()]
    arrays += [a for name in sorted(trainer.optimizer.state) for a in trainer.optimizer.state[name]]
    return [trainer.backend.to_numpy(a) for a in arrays]


class HalvedSGD(SGD):
    """A test-only optimiser the fast paths do not know: SGD's type, at half the rate."""

    def apply(self, ops, lr):
        super().apply(ops, lr / 2)


@pytest.mark.parametrize("path", PATHS)
def test_an_optimiser_the_paths_do_not_know_is_declined_and_trained_by_the_reference_loop(monkeypatch, path):
    """The failure this contract exists for: a subclass of SGD, trained as plain SGD by a fast path
    that read its settings. It is declined (with a warning where the compiled path was asked
    for), and its own rule trains it, as on the reference backend."""
    backend = compiled_backend(path)
    config = TrainConfig(batch_size=7, hidden=(16,), dtype="float64", lr=0.01, momentum=0.9)
    plain = xpnet.Trainer(backend, DATA, config)
    monkeypatch.setitem(optim.OPTIMIZERS, "sgd", HalvedSGD)
    with pytest.warns(RuntimeWarning, match="not run this: it lowers the optimisers SGD, not HalvedSGD"):
        halved = xpnet.Trainer(backend, DATA, config, compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not asked for: declined without a word
        reference = xpnet.Trainer("numpy", DATA, config)
        assert xpnet.Trainer(backend, DATA, config).compiled_steps is None
    assert halved.compiled_steps is None and plain.compiled_steps is not None
    losses = [run.run_steps(STEPS) for run in (halved, reference, plain)]
    numpy.testing.assert_allclose(losses[0], losses[1], rtol=1e-9, atol=0)
    for got, expected in zip(state(halved), state(reference)):
        numpy.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
    assert not numpy.allclose(state(halved)[0], state(plain)[0], rtol=1e-6)  # another rule than SGD's


class WiderMLP(MLP):
    pass


class ScaledLinear(Linear):
    pass


def test_lowering_is_judged_by_exact_type_and_activation():
    backend = xpnet.get_backend("numpy")
    model = MLP(backend, [784, 16, 10])
    optimizer = SGD(backend, model.parameters(), 0.1)
    assert steps.lowering_problem(model, optimizer, (SGD,), ACTIVATIONS) is None
    assert "not HalvedSGD" in steps.lowering_problem(model, HalvedSGD(backend, [], 0.1), (SGD,), ACTIVATIONS)
    assert "the MLP of Linear layers only" in steps.lowering_problem(
        WiderMLP(backend, [784, 10]), optimizer, (SGD,), ACTIVATIONS
    )
    model.net.layers[0].__class__ = ScaledLinear
    assert "the MLP of Linear layers only" in steps.lowering_problem(model, optimizer, (SGD,), ACTIVATIONS)
    model.net.layers[0].__class__ = Linear
    assert "not relu" in steps.lowering_problem(model, optimizer, (SGD,), ("identity",))


def test_backends_without_a_compiled_path_decline_every_run():
    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=256), TrainConfig(batch_size=64))
    data = TrainingData(trainer.train_x, trainer.train_y, None)
    declined = trainer.backend.compile_steps(trainer.model, trainer.optimizer, data, 64)
    assert isinstance(declined, Declined) and "the numpy backend has no compiled path" in declined.reason
    assert trainer.compiled_steps is None and numpy.isfinite(trainer.run_steps()).all()
    with pytest.warns(RuntimeWarning, match="the numpy backend has no compiled path"):
        xpnet.Trainer("numpy", synthetic_splits(n_train=256), TrainConfig(batch_size=64), compiled=True)
