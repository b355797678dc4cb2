"""`xpnet predict`: the digit in each image, with the three most probable classes."""

import numpy

from xpnet.backends import get_backend
from xpnet.data.images import mnist_like
from xpnet.nn.checkpoint import load_model


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = numpy.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def run(args):
    model = load_model(args.checkpoint, get_backend(args.backend))
    images = numpy.stack([mnist_like(path) for path in args.images])
    probabilities = softmax(model.predict_logits(images).astype(numpy.float64))
    for path, p in zip(args.images, probabilities):
        top = numpy.argsort(p)[::-1][:3]
        print(f"{path}: {top[0]}  (" + ", ".join(f"{k}: {p[k]:.3f}" for k in top) + ")")
    return 0
