"""The multilayer perceptron: Linear hidden layers with an activation fused in, a Linear output
layer, and the input normalisation it was trained with (kept with the model, since it is part of it)."""

import numpy

from xpnet.backends import get_backend
from xpnet.errors import ArgumentError
from xpnet.nn.checkpoint import ARCHITECTURE, Checkpoint, load_checkpoint
from xpnet.nn.layers import Dropout, Linear, Sequential
from xpnet.nn.loss import softmax


def pixel_statistics(images):
    """Mean and standard deviation of all pixels of a (training) image set, in float64. uint8 images
    are counted by value: the sums come from 256 counts, without a float64 copy of every pixel
    (0.1 s for MNIST's training split where the copy took 0.7-1.4 s; the same bits there)."""
    if images.dtype != numpy.uint8:
        pixels = images.astype(numpy.float64)
        return pixels.mean(), pixels.std()
    counts = numpy.bincount(images.reshape(-1), minlength=256)
    values = numpy.arange(256)
    n = counts.sum()
    mean = numpy.float64(int(counts @ values) / n)  # the exact integer sum, rounded once
    return mean, numpy.sqrt((counts * (values - mean) ** 2).sum() / n)


def confusion_matrix(labels, predictions, n_classes):
    """counts[i, j]: how many images of class i were predicted as j (rows true, columns predicted)."""
    matrix = numpy.zeros((n_classes, n_classes), dtype=numpy.int64)
    numpy.add.at(matrix, (labels, predictions), 1)
    return matrix


class MLP:
    """sizes = [784, 200, 10] gives 784-200-10; any number of hidden layers works, each with the
    named activation (the output layer has none: its logits go to the softmax), and each
    followed by a Dropout layer where dropout (its probability) is above 0.

    mean and std are the training pixels' (0..255 scale): inputs are normalised with them.
    Weights come from the seed, or from rng when given (the trainer shares its generator).
    """

    def __init__(
        self, backend, sizes, seed=0, dtype="float32", mean=0.0, std=1.0, rng=None, activation="relu", dropout=0.0
    ):
        if len(sizes) < 2 or min(sizes) < 1:
            raise ArgumentError(f"an MLP needs at least two positive layer sizes, got {sizes}")
        self.backend = backend
        self.sizes = list(sizes)
        self.dtype = numpy.dtype(dtype)
        self.mean, self.std = float(mean), float(std)
        self.activation = activation
        rng = numpy.random.default_rng(seed) if rng is None else rng
        self.dropout = dropout
        last, layers = len(sizes) - 2, []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(Linear(backend, n_in, n_out, rng, self.dtype, activation if i < last else "identity", i > 0))
            if dropout and i < last:
                layers.append(Dropout(backend, dropout, layer=i))
        self.net = Sequential(layers)
        self.linear_layers = [layer for layer in layers if isinstance(layer, Linear)]

    @classmethod
    def from_checkpoint(cls, checkpoint, backend=None):
        """The model a checkpoint holds, on a Backend or a backend's name (None: the default)."""
        if backend is None or isinstance(backend, str):
            backend = get_backend(backend)
        architecture = checkpoint.architecture()
        model = cls(backend, architecture.pop("sizes"), **architecture)
        model.load_params(checkpoint.params)
        return model

    def load_params(self, host_arrays):
        """Write host arrays (W then b of each layer) into the parameters, in place."""
        for parameter, array in zip(self.parameters(), host_arrays):
            parameter.value[...] = self.backend.asarray(array, self.dtype)

    def architecture(self):
        """Everything but the weights that the model needs to predict, as checkpoints record it."""
        return {**{key: getattr(self, key) for key in ARCHITECTURE}, "dtype": self.dtype.name}

    def parameters(self):
        """W and b of each layer, in order: the Parameters SGD updates."""
        return self.net.parameters()

    def normalize(self, host_images):
        """Flattened float pixels, (pixels - mean) / std, on the host in the model's dtype."""
        flat = host_images.reshape(len(host_images), self.sizes[0]).astype(self.dtype)
        flat -= self.dtype.type(self.mean)
        flat /= self.dtype.type(self.std)
        return flat

    def forward(self, x, draw=None):
        """Logits of a normalised batch x on the backend; draw, a training step's philox.Draw,
        is where its Dropout layers draw their masks (None: no dropout, as in evaluation). The
        logits are the last layer's buffer, which the next call of the same batch size
        overwrites: copy them to keep them (predict_logits returns a copy)."""
        for layer in self.net.layers:
            if isinstance(layer, Dropout):
                layer.draw = draw
        return self.net.forward(x)

    def backward(self, grad_logits):
        """Gradients of every parameter from dL/dlogits (the first layer's input gradient is skipped)."""
        return self.net.backward(grad_logits)

    # -- using a trained model -----------------------------------------------------------------
    def pixels(self, images):
        """(a batch of rows, one image?, the scale to 0..255) for uint8 images in 0..255 or float
        images in [0, 1] (torchvision's ToTensor convention): a batch (n, 28, 28) or (n, 784), or
        one image. Only shapes and types are checked here; each chunk's values by check_pixels."""
        images = numpy.asarray(images)
        n_in = self.sizes[0]
        row_size = int(numpy.prod(images.shape[1:])) if images.ndim >= 2 else None
        single = images.size == n_in and row_size != n_in
        if not single and row_size != n_in:
            raise ArgumentError(
                f"images must be a batch shaped (n, 28, 28) or (n, {n_in}), or one image of {n_in} pixels; "
                f"got shape {images.shape}"
            )
        if images.dtype.kind not in "iuf":
            raise ArgumentError(f"images must be uint8 (0..255) or float ([0, 1]), got {images.dtype}")
        return images.reshape(-1, n_in), single, 255 if images.dtype.kind == "f" else 1

    @staticmethod
    def check_pixels(images):
        """Raise ArgumentError for pixel values this model would misread (never a silent wrong answer)."""
        if images.dtype == numpy.uint8 or not images.size:
            return
        low, high = images.min(), images.max()
        if images.dtype.kind in "iu" and (low < 0 or high > 255):
            raise ArgumentError(
                f"integer images must hold pixels in 0..255, got {low}..{high}; for floats in [0, 1] pass a float array"
            )
        if images.dtype.kind in "iu" and high == 1:
            raise ArgumentError(
                "integer images hold only 0 and 1, where pixels are read as 0..255: pass images * 255, "
                "or floats in [0, 1]"
            )
        if images.dtype.kind == "f" and not (numpy.isfinite(low) and numpy.isfinite(high) and low >= 0 and high <= 1):
            raise ArgumentError(
                f"float images must lie in [0, 1] (as torchvision's ToTensor gives), got values from "
                f"{low} to {high}; pass 0..255 pixels as uint8, or divide them by 255"
            )

    def predict_logits(self, images, batch_size=None):
        """Logits (host, the model's dtype) for images as ``pixels`` takes them, batch_size at a
        time (the backend's eval_rows when None): each chunk is checked, scaled and normalised
        on its own, so memory beyond the logits stays flat in the number of images."""
        batch_size = batch_size or self.backend.eval_rows
        rows, single, scale = self.pixels(images)
        logits = numpy.empty((len(rows), self.sizes[-1]), self.dtype)
        for start in range(0, len(rows), batch_size):  # none for no rows: no kernel runs on nothing
            chunk = rows[start : start + batch_size]
            self.check_pixels(chunk)
            x = self.backend.asarray(
                self.normalize(numpy.multiply(chunk, scale, dtype=numpy.float64) if scale != 1 else chunk)
            )
            logits[start : start + len(chunk)] = self.backend.to_numpy(self.forward(x))
        return logits[0] if single else logits

    def predict_proba(self, images):
        """Class probabilities (float64, rows sum to 1) for images as ``pixels`` takes them."""
        return softmax(self.predict_logits(images))

    def predict(self, images):
        """The most probable class of each image (an int64 array, or one int for one image)."""
        labels = self.predict_logits(images).argmax(axis=-1)
        return int(labels) if labels.ndim == 0 else labels

    def save(self, path):
        """Write the model alone (weights, architecture, normalisation) for xpnet.load_model."""
        params = [self.backend.to_numpy(p.value) for p in self.parameters()]
        Checkpoint(params=params, **self.architecture()).save(path)


def load_model(path, backend=None):
    """The trained MLP of a checkpoint (a training run's or a saved model's), on any backend:
    a Backend object or its name; None means the default, as for get_backend()."""
    return MLP.from_checkpoint(load_checkpoint(path), backend)
