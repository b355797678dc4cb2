"""The backend interface: every op the layers need, written once in terms of ``self.xp``.

A backend is an object, so several live in one process (that is how the parity tests compare
them). NumPy and CuPy run this code as it is, with their own ``xp``; a faster backend overrides
only the ops it fuses. Ops that take ``out`` write into it and return it, so the layers can
preallocate their buffers once per batch shape instead of once per step.
"""

import numpy


class Backend:
    name = "numpy"
    xp = numpy

    # -- placement ------------------------------------------------------------------------
    def asarray(self, host_array, dtype=None):
        """Move a host array onto this backend (a no-op on the CPU when dtype already fits)."""
        return self.xp.asarray(host_array, dtype=dtype)

    def to_numpy(self, array):
        """Move an array back to the host: the only way out, so copies are never silent."""
        return numpy.asarray(array)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self):
        """Wait until queued work is done; timers call this before reading the clock."""

    def prepare(self, dtype):
        """Compile whatever this backend compiles for dtype; returns the seconds it took."""
        return 0.0

    def take_rows(self, source, indices, out=None):
        """out[i] = source[indices[i]]: the mini-batch gather, done where the data lives."""
        return self.xp.take(source, indices, axis=0, out=out)

    # -- compute --------------------------------------------------------------------------
    def linear_forward(self, x, W, b, relu=False, out=None):
        """y = x @ W.T + b, then max(y, 0) when relu is set (so a backend may fuse the two)."""
        out = self.xp.matmul(x, W.T, out=out)
        out += b
        if relu:
            self.xp.maximum(out, 0, out=out)
        return out

    def linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x=None, relu_output=None):
        """grad_W = grad_y.T @ x, grad_b = sum over rows of grad_y, grad_x = grad_y @ W.

        With relu_output (the layer's fused ReLU output) grad_y is first masked in place by
        relu_output > 0, the ReLU backward. grad_x is skipped when None: the first layer's
        input gradient has no use. Results go into the given buffers; returns grad_x.
        """
        if relu_output is not None:
            self.relu_backward(relu_output, grad_y, out=grad_y)
        self.xp.matmul(grad_y.T, x, out=grad_W)
        self.xp.sum(grad_y, axis=0, out=grad_b)
        if grad_x is not None:
            self.xp.matmul(grad_y, W, out=grad_x)
        return grad_x

    def relu(self, z, out=None):
        """a = max(z, 0)."""
        return self.xp.maximum(z, 0, out=out)

    def relu_backward(self, a, grad_a, out=None):
        """grad_z = grad_a * (a > 0), with a the ReLU's output (a > 0 exactly where z > 0)."""
        return self.xp.multiply(grad_a, a > 0, out=out)

    def softmax_cross_entropy(self, logits, labels, grad_out=None):
        """Mean cross-entropy of softmax(logits) and its gradient grad = (softmax - onehot) / n.

        Stable for any finite logits: each row's maximum is subtracted before exp, so exp never
        overflows and the log-sum-exp is at least 0. Returns (loss as a 0-d array, grad).
        """
        xp = self.xp
        n = logits.shape[0]
        rows = xp.arange(n)
        shifted = logits - logits.max(axis=1, keepdims=True)
        grad = xp.exp(shifted, out=grad_out)
        sums = grad.sum(axis=1, keepdims=True)
        loss = (xp.log(sums[:, 0]) - shifted[rows, labels]).mean()
        grad /= sums
        grad[rows, labels] -= 1
        grad /= n
        return loss, grad

    def count_correct(self, logits, labels):
        """How many rows' largest logit is at the label, as a 0-d array (stays on the device)."""
        return (logits.argmax(axis=1) == labels).sum()

    def sgd_update(self, param, grad, lr, velocity=None, momentum=0.0, nesterov=False, weight_decay=0.0):
        """param -= lr * step, in place, where g = grad + weight_decay * param and step = g
        (plain), v = momentum * v + g then step = v (momentum) or g + momentum * v (Nesterov),
        as torch.optim.SGD defines them. velocity is updated in place.

        grad is spent: this version works in it (it is left holding lr * step) to avoid
        temporaries. Nothing reads a gradient after its update; the next backward overwrites it.
        """
        if weight_decay:
            grad += weight_decay * param
        if velocity is not None:
            velocity *= momentum
            velocity += grad
            if nesterov:
                grad += momentum * velocity
            else:
                grad[...] = velocity
        self.xp.multiply(grad, lr, out=grad)
        self.xp.subtract(param, grad, out=param)
