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
(``Linear``, ``ReLU``, ``Dropout``, ``Sequential``, ``SoftmaxCrossEntropy``), ``SGD`` updates
parameters, and ``MLP`` puts them together with the input normalisation; ``Draw`` says where a
training step's dropout masks are drawn.
"""

import importlib

# Each public name by the module that defines it, imported at first use (PEP 562): `import xpnet`
# costs nothing until a name is used, so the `xpnet` command answers Ctrl-C from its first moment
# (src/xpnet/__main__.py) and `from xpnet import Trainer` works as ever.
_HOMES = {
    "xpnet.backends": ("Backend", "available_backends", "get_backend"),
    "xpnet.backends.philox": ("Draw",),
    "xpnet.data": ("Split", "Splits", "load_dataset"),
    "xpnet.errors": ("ArgumentError", "BackendUnavailable", "ConfigError", "DataError", "XpnetError"),
    "xpnet.nn.checkpoint": ("load_checkpoint",),
    "xpnet.nn.layers": ("Dropout", "Linear", "ReLU", "Sequential"),
    "xpnet.nn.loss": ("SoftmaxCrossEntropy", "softmax"),
    "xpnet.nn.model": ("MLP", "confusion_matrix", "load_model"),
    "xpnet.nn.optim": ("SGD",),
    "xpnet.nn.train": ("Diverged", "History", "TrainConfig", "Trainer", "seed_lr"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'xpnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted({*globals(), *_HOME})


__version__ = "0.1.0"

__all__ = sorted(_HOME)
