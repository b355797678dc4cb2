"""The peers `xpnet bench` times (src/xpnet/bench_peers.py) do the same work as xpnet: from the
same weights and batch, one SGD step of each equals the NumPy reference's step. Skipped where
a peer is not installed (CI installs neither; `pip install 'xpnet[peers]'` adds both)."""

import importlib.util

import numpy
import pytest

import xpnet
from xpnet.data.synthetic import synthetic_splits


def reference_step(lr=0.05):
    """A float64 784-32-16-10 trainer's first batch, its weights before and after one step."""
    config = xpnet.TrainConfig(batch_size=64, hidden=(32, 16), dtype="float64", lr=lr)
    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=64), config, compiled=False)
    x, y = trainer.batch(0)
    before = [p.value.copy() for p in trainer.model.parameters()]
    trainer.step(x, y)
    return x, y, before, [p.value for p in trainer.model.parameters()], lr


def needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


# Both sides compute the same float64 sums (at most 784 terms) in different orders: they agree
# to about 784 * eps relative, far inside 1e-10, and a different step (a summed instead of a
# mean loss, a missing ReLU) misses it by orders of magnitude.
RTOL = 1e-10


@needs("torch")
def test_torch_takes_the_same_sgd_step():
    import torch

    from xpnet.bench_peers import torch_mlp, torch_sgd_step

    x, y, before, after, lr = reference_step()
    model = torch_mlp([784, 32, 16, 10], torch.float64, "cpu")
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), before):
            parameter.copy_(torch.from_numpy(value))
    torch_sgd_step(model, torch.optim.SGD(model.parameters(), lr=lr), torch.from_numpy(x), torch.from_numpy(y))
    for parameter, expected in zip(model.parameters(), after):
        numpy.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=RTOL, atol=0)


@needs("jax")
def test_jax_takes_the_same_sgd_step():
    import jax

    from xpnet.bench_peers import jax_sgd_step

    jax.config.update("jax_enable_x64", True)
    x, y, before, after, lr = reference_step()
    params = [(before[i], before[i + 1]) for i in range(0, len(before), 2)]
    params, _ = jax.jit(jax_sgd_step(lr))(params, x, y, numpy.arange(len(y)))
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
