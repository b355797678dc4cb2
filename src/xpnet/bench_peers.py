"""The peers a user would pick instead of xpnet, timed by xpnet bench beside its backends on
the same MLP (784-hidden-10, ReLU, He initialisation), the same random data and the same plain
SGD on the mean loss at the seed's rate: PyTorch eager, torch.compile, and on a GPU the whole step
captured as one CUDA graph; JAX as its users write it, jit of one step and jit of a whole epoch
(lax.scan over the batches). Each is an optional install (`pip install 'xpnet[peers]'` for JAX;
torch by hand, its CPU build from PyTorch's own index); a peer that is not installed is left out.

Precision is part of a row's name on a GPU. xpnet keeps float32 products at float32 (TF32 off),
so its parity bounds hold. PyTorch's default does too (`torch.backends.cuda.matmul.allow_tf32`
is False), and its rows say so. JAX computes float32 dot products with TF32 on Ampere and later
GPUs unless asked otherwise (its "Matmul precision" documentation), so its rows come at float32
precision (`precision="highest"`), the comparison that means something, and its scanned epoch
also at its default, labelled as TF32.
"""

from typing import NamedTuple

import numpy

from xpnet.bench import N_SAMPLES, SGD_RELU, Contender

# Their thread pools keep spinning after their work. Measured on the 2-core machine, a floor
# epoch at batch 128 started right after JAX's epoch ran at half speed (136k against 268k
# samples/s), still at 174k after 0.1 s and at full speed after 0.2 s; after torch's (CPU)
# about 8% slower, at full speed after 0.05 s. The next contender runs untimed for twice that.
JAX_SETTLE_SECONDS = 0.5
TORCH_SETTLE_SECONDS = 0.1


# torch.compile's modes by peer name: "reduce-overhead" replays the compiled forward and backward
# as CUDA graphs, what its documentation advises for small batches; on a CPU it has no graphs to
# replay, so that peer runs on the GPU only.
TORCH_COMPILE_MODES = {"torch": None, "torch-compile": "default", "torch-graphs": "reduce-overhead"}
# The whole training step (gather, forward, backward, optimizer.step()) captured once with
# torch.cuda.graph and replayed: PyTorch at its fastest on small batches, as its CUDA Graphs
# documentation teaches ("whole network capture"). A GPU only, like torch-graphs.
TORCH_STEP_GRAPH = "torch-step-graph"
GPU_ONLY_PEERS = ("torch-graphs", TORCH_STEP_GRAPH)
# The peers `xpnet bench --peers` can name: torch's modes, its captured step, and JAX.
PEERS = (*TORCH_COMPILE_MODES, TORCH_STEP_GRAPH, "jax")
# JAX's matmul precisions timed on a GPU: float32 ("highest"), and its default, which is TF32 there.
JAX_FLOAT32, JAX_DEFAULT = "highest", None


def torch_contender(
    batch_size, hidden=(200,), dtype="float32", device="cpu", n_samples=N_SAMPLES, compile_mode=None, rule=SGD_RELU
):
    """PyTorch on the same MLP, data and SGD: eager (compile_mode None), the anchor a user would
    otherwise pick, or with the model wrapped in torch.compile(mode=compile_mode) as its
    tutorials do (compiled in the warm-up epoch, the last, smaller batch included)."""
    import torch

    model, optimizer, x_all, y_all, generator = torch_training(batch_size, hidden, dtype, device, n_samples, rule)
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    # CUDA-graph replays reuse their output memory; torch's documentation asks to mark where each
    # training step begins.
    begin_step = torch.compiler.cudagraph_mark_step_begin if compile_mode == "reduce-overhead" else (lambda: None)

    def epoch():
        order = torch.as_tensor(generator.permutation(n_samples), device=device)
        for start in range(0, n_samples, batch_size):
            rows = order[start : start + batch_size]
            begin_step()
            torch_sgd_step(forward, optimizer, x_all[rows], y_all[rows])

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return Contender(
        f"torch {compile_mode_label(compile_mode)} ({torch_device_label(device)}){rule.label()}",
        epoch,
        synchronize,
        n_samples,
        host_arrays=False,
        extra=torch_extra(device),
        settle_seconds=TORCH_SETTLE_SECONDS if device == "cpu" else 0.0,
        peer=True,
        gpu=device != "cpu",
    )


def torch_peer(name, device, batch_size, hidden=(200,), dtype="float32", rule=SGD_RELU):
    """The contender of one of torch's peers (a name of PEERS) on one device."""
    if name == TORCH_STEP_GRAPH:
        return torch_step_graph_contender(batch_size, hidden, dtype, rule=rule)
    return torch_contender(batch_size, hidden, dtype, device, compile_mode=TORCH_COMPILE_MODES[name], rule=rule)


def torch_device_label(device):
    """The device, and on CUDA whether float32 products may use TF32 (torch's default: they may not)."""
    import torch

    if device != "cuda":
        return device
    return f"cuda, TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"


def torch_extra(device):
    import torch

    extra = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        extra["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return extra


def torch_step_graph_contender(batch_size, hidden=(200,), dtype="float32", n_samples=N_SAMPLES, rule=SGD_RELU):
    """PyTorch with the whole step captured once by torch.cuda.graph and replayed per batch: the
    batch's rows copied into a static buffer and gathered inside the graph, forward, backward and
    optimizer.step() (capturable=True where this torch's SGD has it; plain SGD keeps no state a
    replay could get wrong). Three eager steps on a side stream warm up first, as the documentation
    asks. The last, smaller batch runs eager, as JAX's scan leaves it to its jitted step."""
    import torch

    device = "cuda"
    model, optimizer, x_all, y_all, generator = torch_training(
        batch_size, hidden, dtype, device, n_samples, rule, capturable=True
    )
    rows = torch.zeros(batch_size, dtype=torch.int64, device=device)

    def captured_step():
        torch_sgd_step(model, optimizer, x_all[rows], y_all[rows])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            captured_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # gradients allocated inside the capture, from its pool
    with torch.cuda.graph(graph):
        captured_step()
    full = n_samples // batch_size * batch_size

    def epoch():
        order = torch.as_tensor(generator.permutation(n_samples), device=device)
        for start in range(0, full, batch_size):
            rows.copy_(order[start : start + batch_size])
            graph.replay()
        if full < n_samples:
            torch_sgd_step(model, optimizer, x_all[order[full:]], y_all[order[full:]])

    return Contender(
        f"torch step graph ({torch_device_label(device)}){rule.label()}",
        epoch,
        torch.cuda.synchronize,
        n_samples,
        host_arrays=False,
        extra=torch_extra(device),
        peer=True,
        gpu=True,
    )


def compile_mode_label(compile_mode):
    return {None: "eager", "default": "compile"}.get(compile_mode, f"compile {compile_mode}")


class TorchTraining(NamedTuple):
    """What each PyTorch contender trains: xpnet's MLP from seed 0, its optimizer, the epoch's
    random rows and labels on the device, and the generator of each epoch's row order."""

    model: object
    optimizer: object
    x_all: object
    y_all: object
    generator: numpy.random.Generator


def torch_training(batch_size, hidden, dtype, device, n_samples, rule, capturable=False):
    """A TorchTraining of the rule's optimizer and activation; capturable asks the optimizer for a
    CUDA-graph-safe step, where this torch's has the flag."""
    import inspect

    import torch

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = torch_mlp([784, *hidden, 10], torch_dtype, device, rule.activation)
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[rule.optimizer]
    has_flag = "capturable" in inspect.signature(kind).parameters
    options = {"capturable": True} if capturable and has_flag else {}
    optimizer = kind(model.parameters(), lr=rule.lr(batch_size), **options)
    x_all = torch.randn(n_samples, 784, dtype=torch_dtype, device=device)
    y_all = torch.randint(0, 10, (n_samples,), device=device)
    return TorchTraining(model, optimizer, x_all, y_all, numpy.random.default_rng(0))


def torch_mlp(sizes, torch_dtype, device, activation="relu"):
    """torch.nn.Linear layers of the given sizes with the activation between them: xpnet's MLP."""
    import torch

    kinds = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU}
    hidden_activation = kinds[activation]  # GELU: approximate="none", erf's exact form, as xpnet's
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(hidden_activation())
    return torch.nn.Sequential(*layers).to(device=device, dtype=torch_dtype)


def torch_sgd_step(forward, optimizer, x, y):
    """One step as torch users write it: zero the gradients, mean cross-entropy, backward, step."""
    import torch

    # Gradients set to None, torch's default: zeroed in place instead, each .grad would stay the
    # memory of a CUDA-graph replay's output, which the next replay overwrites before the backward
    # pass adds to it (torch-graphs raised so on an H100).
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(forward(x), y)
    loss.backward()
    optimizer.step()
    return loss


def jax_contenders(batch_size, hidden=(200,), dtype="float32", n_samples=N_SAMPLES, rule=SGD_RELU):
    """JAX on its default device (the GPU where jax has one): jit of one training step (the gather
    inside it), and jit of the epoch, a lax.scan over its full batches (the last, partial batch
    by the step function). On a GPU in float32, each at float32 precision, and the scanned epoch
    also at JAX's default precision (TF32 there); elsewhere the precision changes nothing."""
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rng = numpy.random.default_rng(0)
    sizes = [784, *hidden, 10]
    start = [
        ((rng.standard_normal((n_out, n_in)) / numpy.sqrt(n_in / 2)).astype(dtype), numpy.zeros(n_out, dtype))
        for n_in, n_out in zip(sizes[:-1], sizes[1:])
    ]
    x_all = jnp.asarray(rng.standard_normal((n_samples, 784)).astype(dtype))
    y_all = jnp.asarray(rng.integers(0, 10, n_samples))
    device = jax.devices()[0].platform  # JAX runs where its first device is: a GPU where it has one
    full = n_samples // batch_size

    def contender(name, by_scan, precision=JAX_FLOAT32):
        train_step = jax_train_step(rule, rule.lr(batch_size), precision)
        step = jax.jit(train_step)

        @jax.jit
        def scanned(carry, x_all, y_all, order):
            batches = order[: full * batch_size].reshape(full, batch_size)
            return jax.lax.scan(lambda c, rows: train_step(c, x_all, y_all, rows), carry, batches)

        params = jax.tree_util.tree_map(jnp.asarray, start)
        state = {"carry": jax_start(rule, params), "order": numpy.random.default_rng(0)}

        def epoch():
            order = jnp.asarray(state["order"].permutation(n_samples))
            carry, first = state["carry"], 0
            if by_scan:
                carry, _ = scanned(carry, x_all, y_all, order)
                first = full * batch_size
            for begin in range(first, n_samples, batch_size):
                carry, _ = step(carry, x_all, y_all, order[begin : begin + batch_size])
            state["carry"] = carry

        def synchronize():
            jax.block_until_ready(state["carry"])

        return Contender(
            name + rule.label(), epoch, synchronize, n_samples, host_arrays=False, extra={"jax": jax.__version__},
            peer=True, settle_seconds=JAX_SETTLE_SECONDS, gpu=device != "cpu",
        )  # fmt: skip

    if device == "cpu" or dtype != "float32":
        return [
            contender(f"jax jit step ({device})", by_scan=False),
            contender(f"jax jit + scan epoch ({device})", by_scan=True),
        ]
    return [
        contender(f"jax jit step ({device}, float32 precision)", by_scan=False),
        contender(f"jax jit + scan epoch ({device}, float32 precision)", by_scan=True),
        contender(f"jax jit + scan epoch ({device}, default precision: TF32)", by_scan=True, precision=JAX_DEFAULT),
    ]


def jax_start(rule, params):
    """A training step's carry at the start: the params for SGD; for Adam, the params, the first
    and second moments (zeros) and the step count."""
    import jax
    import jax.numpy as jnp

    if rule.optimizer == "sgd":
        return params
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return params, zeros, zeros, jnp.zeros((), jnp.int32)


def jax_train_step(rule, lr, precision=JAX_FLOAT32):
    """train_step(carry, x_all, y_all, rows) -> (carry, loss): one step of the rule's optimizer on
    the rows' mean cross-entropy, params a list of (W, b) with y = f(x @ W.T + b), as JAX users
    write it: plain SGD, or Adam as torch.optim.Adam defines it (betas 0.9 and 0.999, eps 1e-8 added
    to the bias-corrected root). precision is each product's (and so its transposes' in the
    backward pass): "highest" keeps float32 products at float32 on a GPU; None is JAX's default."""
    import jax
    import jax.numpy as jnp

    hidden_activation = {
        "relu": jax.nn.relu,
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    }[rule.activation]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def mean_loss(params, x, y):
        for W, b in params[:-1]:
            x = hidden_activation(jnp.matmul(x, W.T, precision=precision) + b)
        W, b = params[-1]
        log_p = jax.nn.log_softmax(jnp.matmul(x, W.T, precision=precision) + b)
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))

    def sgd_step(params, x_all, y_all, rows):
        loss, grads = jax.value_and_grad(mean_loss)(params, x_all[rows], y_all[rows])
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

    def adam_step(carry, x_all, y_all, rows):
        params, m, v, t = carry
        loss, grads = jax.value_and_grad(mean_loss)(params, x_all[rows], y_all[rows])
        t = t + 1
        m = jax.tree_util.tree_map(lambda m, g: beta1 * m + (1 - beta1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: beta2 * v + (1 - beta2) * g * g, v, grads)
        step_size = lr / (1 - beta1**t)
        root_correction = jnp.sqrt(1 - beta2**t)

        def update(p, m, v):
            return p - step_size * m / (jnp.sqrt(v) / root_correction + eps)

        return (jax.tree_util.tree_map(update, params, m, v), m, v, t), loss

    return sgd_step if rule.optimizer == "sgd" else adam_step

    return sgd_step
