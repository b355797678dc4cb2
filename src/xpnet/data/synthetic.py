"""Random MNIST-shaped data in memory: for timing (throughput does not depend on the pixels) and
for tests of behaviour rather than accuracy. Nothing here can be learned."""

import numpy

from xpnet.data.mnist import Split, Splits


def synthetic_splits(n_train=50_000, n_validation=10, n_test=10, classes=10, seed=0):
    """Splits of uniform random 28 x 28 uint8 images with uniform random labels in [0, classes)."""
    rng = numpy.random.default_rng(seed)

    def split(n):
        images = rng.integers(0, 256, (n, 28, 28), dtype=numpy.uint8)
        return Split(images, rng.integers(0, classes, n).astype(numpy.uint8))

    return Splits(train=split(n_train), validation=split(n_validation), test=split(n_test))
