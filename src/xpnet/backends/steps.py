"""The fast-path contract: what a backend's compile_steps returns, and what it lowers.

The trainer's reference loop runs any model and optimiser, the layers calling the backend's
ops a step at a time. A backend may also offer a compiled path that takes many steps in one
call (Numba's compiled loop, CuPy's CUDA graphs). Such a path writes the step again in its own
terms, so it lowers only what it knows, judged by exact type and settings (lowering_problem);
for anything else compile_steps returns base.Declined with the reason, and the trainer runs
the reference loop. A fast path may be slower than asked, never different.
"""

import abc
from typing import NamedTuple

from xpnet.backends.base import ACTIVATIONS, FLOAT_DTYPES, PRE_ACTIVATION
from xpnet.nn.layers import Linear
from xpnet.nn.model import MLP


class TrainingData(NamedTuple):
    """What a compiled path trains on: x, the normalised training rows, and y, their labels, on the
    backend; images, the host images x was normalised from, which a path may gather from instead
    (Numba's loop does, from uint8 pixels: a quarter of the bytes of float32 rows), or None. The
    trainer may rewrite x in place between epochs (with --augment, each epoch's deformed images)."""

    x: object
    y: object
    images: object


class StepBuffers(NamedTuple):
    """The arrays of the last step a compiled path took, named alike on every backend (`xpnet verify`
    reads them): the batch (inputs, labels), and for each layer its output, the loss's gradient
    with respect to that output (grads_y; the last layer's is the logits' gradient) and that
    gradient through the activation's derivative (grads_z; not written for identity layers)."""

    inputs: object
    labels: object
    outputs: tuple
    grads_y: tuple
    grads_z: tuple

    def grad_x(self, layer):
        """The gradient with respect to a layer's input: the layer before's grads_y (layer > 0)."""
        return self.grads_y[layer - 1]


CHUNKS_PER_EPOCH = 20  # run() calls an epoch takes by default (CompiledSteps.chunk_steps)


class CompiledSteps(abc.ABC):
    """A trainer's steps taken many at a time. It holds the model's and the optimiser's own arrays:
    whoever changes a parameter writes into it (value[...] = ...), as checkpoints and verify do,
    and never swaps the array for another."""

    # Whether the trainer may pass run() any number of steps (True), or must keep one length
    # per call (CuPy's graphs: each length is a graph of its own to capture).
    chunks_may_grow = False

    def chunk_steps(self, steps_per_epoch):
        """How many steps the trainer passes run() at a time to begin with: a twentieth of an
        epoch, so that the progress bar moves and Ctrl-C is answered between calls."""
        return max(1, steps_per_epoch // CHUNKS_PER_EPOCH)

    @abc.abstractmethod
    def run(self, order, first, n, lrs, losses, threads=None):
        """Steps first .. first + n - 1 of the epoch whose row order is `order`, lrs[s] the learning
        rate of its step s, each step's mean loss stored in losses[first + s]; `threads` is the
        trainer's thread count (None: BLAS's own)."""

    @abc.abstractmethod
    def prepare(self, losses):
        """Compile, or load from a cache, whatever run needs, before any step is timed."""

    def count_correct(self, x, y, threads=None):
        """How many rows of x (normalised, on the backend) the model predicts as y, where this path
        has a faster way than the trainer's reference pass; None leaves it to that pass."""
        return None

    def blas_threads(self, threads):
        """The host BLAS thread count to set around run for the trainer's count `threads`."""
        return threads

    @property
    @abc.abstractmethod
    def buffers(self):
        """The StepBuffers of the last step run."""


# The activations a compiled path's step lowers: its buffers keep each layer's output, not the
# pre-activation that GELU's backward pass needs (a buffer a layer for it is left to do).
OUTPUT_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name not in PRE_ACTIVATION)


def lowering_problem(model, optimizer, optimizers, activations):
    """None where a compiled path that lowers exactly these optimiser types and activation names
    can run this model and optimiser; else why it cannot. Exact types: a subclass may change
    anything, so it is never taken for its parent."""
    if type(model) is not MLP:
        return "it lowers the MLP of Linear layers only"
    if model.dropout:
        return "it lowers no dropout (the reference ops draw its masks)"
    if any(type(layer) is not Linear for layer in model.net.layers):
        return "it lowers the MLP of Linear layers only"
    if model.dtype not in FLOAT_DTYPES:
        return f"it lowers float32 and float64, not {model.dtype}"
    unknown = sorted({layer.activation for layer in model.net.layers} - set(activations))
    if unknown:
        return f"it lowers the activations {', '.join(activations)}, not {', '.join(unknown)}"
    if type(optimizer) not in optimizers:
        names = ", ".join(kind.__name__ for kind in optimizers)
        return f"it lowers the optimisers {names}, not {type(optimizer).__name__}"
    return None
