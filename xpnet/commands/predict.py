"""`xpnet predict`: the digit in each image, with the three most probable classes."""

import numpy

from xpnet.data.images import mnist_like
from xpnet.nn.checkpoint import load_model


def run(args):
    model = load_model(args.checkpoint, args.backend)
    images = numpy.stack([mnist_like(path) for path in args.images])
    for path, p in zip(args.images, model.predict_proba(images)):
        top = numpy.argsort(p)[::-1][:3]
        print(f"{path}: {top[0]}  (" + ", ".join(f"{k}: {p[k]:.3f}" for k in top) + ")")
    return 0
