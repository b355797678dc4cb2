"""Softmax + cross-entropy as one layer-like object: fused, because the gradient of the pair is
simply (softmax - onehot) / n, which is both cheaper and stabler than chaining the two."""


class SoftmaxCrossEntropy:
    def __init__(self, backend):
        self.backend = backend
        self._grad = None

    def forward(self, logits, labels):
        """Mean over the batch of -log softmax(logits)[label], as a 0-d backend array."""
        if self._grad is None or self._grad.shape != logits.shape or self._grad.dtype != logits.dtype:
            self._grad = self.backend.empty(logits.shape, logits.dtype)
        loss, self.grad = self.backend.softmax_cross_entropy(logits, labels, grad_out=self._grad)
        return loss

    def backward(self):
        """grad_logits = (softmax(logits) - onehot(labels)) / n, computed during forward."""
        return self.grad
