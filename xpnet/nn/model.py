"""The multilayer perceptron: Linear(relu=True) hidden layers, a Linear output layer, and the
input normalisation it was trained with (kept with the model, since it is part of it)."""

import numpy

from xpnet.nn.layers import Linear, Sequential


def pixel_statistics(images):
    """Mean and standard deviation of all pixels of a (training) image set, in float64."""
    pixels = images.astype(numpy.float64)
    return pixels.mean(), pixels.std()


class MLP:
    """sizes = [784, 200, 10] gives 784-200-10; any number of hidden layers works."""

    def __init__(self, backend, sizes, seed=0, dtype="float32", mean=0.0, std=1.0, rng=None):
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"an MLP needs at least two positive layer sizes, got {sizes}")
        self.backend = backend
        self.sizes = list(sizes)
        self.dtype = numpy.dtype(dtype)
        self.mean, self.std = float(mean), float(std)
        rng = numpy.random.default_rng(seed) if rng is None else rng
        last = len(sizes) - 2
        self.net = Sequential(
            Linear(backend, n_in, n_out, rng, self.dtype, relu=i < last, input_grad=i > 0)
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))
        )

    def parameters(self):
        return self.net.parameters()

    def normalize(self, host_images):
        """Flattened float pixels, (pixels - mean) / std, on the host in the model's dtype."""
        flat = host_images.reshape(len(host_images), -1).astype(self.dtype)
        flat -= self.dtype.type(self.mean)
        flat /= self.dtype.type(self.std)
        return flat

    def forward(self, x):
        return self.net.forward(x)

    def backward(self, grad_logits):
        return self.net.backward(grad_logits)

    def predict_logits(self, host_images, batch_size=2048):
        """Logits for raw (un-normalised) host images, computed in batches, returned to the host."""
        x = self.backend.asarray(self.normalize(host_images))
        return numpy.concatenate(
            [
                self.backend.to_numpy(self.forward(x[start : start + batch_size])).copy()
                for start in range(0, len(x), batch_size)
            ]
        )
