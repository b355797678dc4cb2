"""`xpnet predict`: the digit in each image, with the three most probable classes."""

import sys

import numpy

from xpnet.data.images import mnist_like
from xpnet.errors import DataError
from xpnet.nn.model import load_model


def run(args):
    model = load_model(args.checkpoint, args.backend)
    failed = 0
    for path in args.images:  # one image's fault is reported and the others still read
        try:
            p = model.predict_proba(mnist_like(path))
        except DataError as exc:
            print(f"xpnet: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        top = numpy.argsort(p)[::-1][:3]
        print(f"{path}: {top[0]}  (" + ", ".join(f"{k}: {p[k]:.3f}" for k in top) + ")")
    return 2 if failed else 0
