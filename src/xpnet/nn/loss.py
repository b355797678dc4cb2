"""Softmax + cross-entropy as one layer-like object: fused, because the gradient of the pair is
simply (softmax - onehot) / n, which is both cheaper and stabler than chaining the two."""

import numpy

from xpnet.nn.layers import Buffers


def softmax(logits):
    """Row-wise softmax of host logits in float64, stable: each row's maximum is subtracted first."""
    shifted = numpy.asarray(logits, dtype=numpy.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = numpy.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class SoftmaxCrossEntropy:
    """The loss of a batch of logits against integer labels, with its gradient."""

    def __init__(self, backend):
        self.backend = backend
        self._buffers = Buffers(backend)

    def forward(self, logits, labels):
        """Mean over the batch of -log softmax(logits)[label], as a 0-d backend array."""
        grad_out = self._buffers.get("grad", logits.shape, logits.dtype)
        loss, self.grad = self.backend.softmax_cross_entropy(logits, labels, grad_out=grad_out)
        return loss

    def backward(self):
        """grad_logits = (softmax(logits) - onehot(labels)) / n, computed during forward."""
        return self.grad
