"""The peers `xpnet bench` times (src/xpnet/bench_peers.py) do the same work as xpnet: from the
same weights and batches, each peer's steps equal the NumPy reference's, for each update rule
and activation the bench times. Skipped where a peer is not installed (CI installs neither;
`pip install 'xpnet[peers]'` adds both)."""

import importlib.util

import numpy
import pytest

import xpnet
from xpnet.bench import StepRule
from xpnet.data.synthetic import synthetic_splits

# (rule, rate, steps): Adam's bias corrections change from step to step, so it takes three.
RULES = [
    (StepRule(), 0.05, 1),
    (StepRule("sgd", "sigmoid"), 0.05, 1),
    (StepRule("sgd", "gelu"), 0.05, 1),
    (StepRule("adam", "tanh"), 0.01, 3),
]
RULE_IDS = ["sgd-relu", "sgd-sigmoid", "sgd-gelu", "adam-tanh"]


def reference_steps(rule, lr, steps):
    """A float64 784-32-16-10 trainer's batches, and its weights before and after its steps."""
    config = xpnet.TrainConfig(
        batch_size=64, hidden=(32, 16), dtype="float64", lr=lr, optimizer=rule.optimizer, activation=rule.activation
    )
    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=64 * steps), config, compiled=False)
    before = [p.value.copy() for p in trainer.model.parameters()]
    batches = []
    for k in range(steps):
        x, y = trainer.batch(k)
        batches.append((x.copy(), y.copy()))
        trainer.step(x, y)
    return batches, before, [p.value for p in trainer.model.parameters()]


def needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


# Both sides compute the same float64 sums (at most 784 terms) in different orders: they agree
# to about 784 * eps relative, far inside 1e-10, and a different step (a summed instead of a
# mean loss, a missing ReLU) misses it by orders of magnitude.
RTOL = 1e-10


@needs("torch")
@pytest.mark.parametrize("rule, lr, steps", RULES, ids=RULE_IDS)
def test_torch_takes_the_same_steps(rule, lr, steps):
    import torch

    from xpnet.bench_peers import torch_mlp, torch_sgd_step

    batches, before, after = reference_steps(rule, lr, steps)
    model = torch_mlp([784, 32, 16, 10], torch.float64, "cpu", rule.activation)
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), before):
            parameter.copy_(torch.from_numpy(value))
    optimizer = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[rule.optimizer](model.parameters(), lr=lr)
    for x, y in batches:
        torch_sgd_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y))
    for parameter, expected in zip(model.parameters(), after):
        numpy.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=RTOL, atol=0)


@needs("jax")
@pytest.mark.parametrize("rule, lr, steps", RULES, ids=RULE_IDS)
def test_jax_takes_the_same_steps(rule, lr, steps):
    import jax

    from xpnet.bench_peers import jax_start, jax_train_step

    jax.config.update("jax_enable_x64", True)
    batches, before, after = reference_steps(rule, lr, steps)
    carry = jax_start(rule, [(before[i], before[i + 1]) for i in range(0, len(before), 2)])
    step = jax.jit(jax_train_step(rule, lr))
    for x, y in batches:
        carry, _ = step(carry, x, y, numpy.arange(len(y)))
    params = carry if rule.optimizer == "sgd" else carry[0]
    got = [numpy.asarray(array) for pair in params for array in pair]
    for value, expected in zip(got, after):
        numpy.testing.assert_allclose(value, expected, rtol=RTOL, atol=0)


def test_torch_graphs_run_on_a_gpu_only_and_say_so_elsewhere():
    from xpnet.bench_report import torch_runs

    said = []
    peers = ["torch", "torch-compile", "torch-graphs", "torch-step-graph"]
    assert torch_runs(peers, ["cpu"], said.append) == [("cpu", "torch"), ("cpu", "torch-compile")]
    assert said == ["torch sees no CUDA device: the torch-graphs, torch-step-graph rows (CUDA graphs) left out"]
    assert torch_runs(peers, ["cpu", "cuda"], said.append)[-4:] == [("cuda", name) for name in peers]
    assert torch_runs(peers, [], said.append) == [] and said[-1].startswith("torch is not installed")
