"""xpnet: a multilayer perceptron for MNIST with hand-written backprop on swappable array backends.

The whole seed recipe from Python::

    import xpnet

    data = xpnet.load_dataset("mnist")               # downloads and verifies once, then cached
    trainer = xpnet.Trainer("numba", data, xpnet.TrainConfig(epochs=5))
    history = trainer.fit()                          # prints a line per epoch
    trainer.model.save("mnist-mlp.npz")
    model = xpnet.load_model("mnist-mlp.npz")         # on the default backend
    model.predict(data.test.images[:10])             # -> array of 10 labels

The pieces are public too: ``get_backend`` gives the array backend whose ops the layers call
(``Linear``, ``ReLU``, ``Sequential``, ``SoftmaxCrossEntropy``), ``SGD`` updates parameters, and
``MLP`` puts them together with the input normalisation.
"""

from xpnet.backends import Backend, available_backends, get_backend
from xpnet.data import Split, Splits, load_dataset
from xpnet.errors import ArgumentError, BackendUnavailable, ConfigError, DataError, XpnetError
from xpnet.nn.checkpoint import load_checkpoint
from xpnet.nn.layers import Linear, ReLU, Sequential
from xpnet.nn.loss import SoftmaxCrossEntropy, softmax
from xpnet.nn.model import MLP, confusion_matrix, load_model
from xpnet.nn.optim import SGD
from xpnet.nn.train import Diverged, History, TrainConfig, Trainer, seed_lr

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "SGD",
    "ArgumentError",
    "Backend",
    "BackendUnavailable",
    "ConfigError",
    "DataError",
    "Diverged",
    "History",
    "Linear",
    "ReLU",
    "Sequential",
    "SoftmaxCrossEntropy",
    "Split",
    "Splits",
    "TrainConfig",
    "Trainer",
    "XpnetError",
    "available_backends",
    "confusion_matrix",
    "get_backend",
    "load_checkpoint",
    "load_dataset",
    "load_model",
    "seed_lr",
    "softmax",
]
