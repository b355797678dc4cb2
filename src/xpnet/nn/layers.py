"""Layers with hand-written forward and backward passes, each backward beside its forward.

A layer's forward keeps what its backward needs; backward takes the gradient of the loss with
respect to the layer's output and returns the gradient with respect to its input, storing
parameter gradients in ``Parameter.grad``. Every computation goes through the backend.
Output and gradient buffers are allocated once per batch shape and then reused.
"""

import numpy

from xpnet.backends.base import PRE_ACTIVATION, check_activation


class Parameter:
    """A trainable array and the gradient of the loss with respect to it (same shape)."""

    def __init__(self, backend, host_value):
        self.value = backend.asarray(host_value)  # a copy: updates never reach the caller's array
        self.grad = backend.empty(self.value.shape, self.value.dtype)


class Buffers:
    """Arrays reused across steps, one per key; reallocated only when the shape or dtype changes."""

    def __init__(self, backend):
        self.backend = backend
        self.arrays = {}

    def get(self, key, shape, dtype):
        array = self.arrays.get(key)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = self.arrays[key] = self.backend.empty(shape, dtype)
        return array


class Linear:
    """y = f(x @ W.T + b), f the layer's activation, by name (base.ACTIVATIONS: "identity" is none).

    activation="relu" is the same function as Linear followed by ReLU (a test checks it);
    fusing them lets a backend add the bias and apply the activation in one pass, and apply its
    derivative while it sums the bias gradient. W is He-initialised, randn(out, in) / sqrt(in / 2),
    from the host generator, so one seed gives the same weights on every backend; b starts at
    zero. The first layer passes input_grad=False: nobody uses the gradient of the data.
    """

    def __init__(self, backend, n_in, n_out, rng, dtype="float32", activation="identity", input_grad=True):
        check_activation(activation)
        self.backend = backend
        self.activation = activation
        self.input_grad = input_grad
        host_W = rng.standard_normal((n_out, n_in)) / numpy.sqrt(n_in / 2)
        self.W = Parameter(backend, host_W.astype(dtype))
        self.b = Parameter(backend, numpy.zeros(n_out, dtype=dtype))
        self._buffers = Buffers(backend)

    @property
    def shape(self):
        return self.W.value.shape

    def parameters(self):
        """[W, b]."""
        return [self.W, self.b]

    def forward(self, x):
        """y = f(x @ W.T + b); keeps x and y for backward, and z = x @ W.T + b where f' needs it (gelu).
        y is this layer's buffer, reused by its next call of the same shape (a step allocates nothing)."""
        self.x = x
        shape = (x.shape[0], self.shape[0])
        out = self._buffers.get("y", shape, x.dtype)
        self.z = self._buffers.get("z", shape, x.dtype) if self.activation in PRE_ACTIVATION else None
        self.y = self.backend.linear_forward(x, self.W.value, self.b.value, self.activation, out, self.z)
        return self.y

    def backward(self, grad_y):
        """grad_W = g.T @ x, grad_b = sum_rows(g), grad_x = g @ W, with g = grad_y * f'(z) (relu: y > 0)."""
        buffer = self._buffers.get
        grad_x = buffer("grad_x", self.x.shape, self.x.dtype) if self.input_grad else None
        grad_z = buffer("grad_z", self.y.shape, self.y.dtype) if self.activation != "identity" else None
        self.backend.linear_backward(
            self.x, self.W.value, grad_y, self.W.grad, self.b.grad, grad_x, self.activation, self.y, grad_z, self.z
        )
        return grad_x


class ReLU:
    """a = max(z, 0), as a layer of its own for any composition; MLPs use Linear(activation="relu")."""

    def __init__(self, backend):
        self.backend = backend

    def parameters(self):
        """[]: a ReLU has nothing to learn."""
        return []

    def forward(self, z):
        """a = max(z, 0); keeps a for backward."""
        self.a = self.backend.relu(z)
        return self.a

    def backward(self, grad_a):
        """grad_z = grad_a * (a > 0)."""
        return self.backend.relu_backward(self.a, grad_a)


class Dropout:
    """Inverted dropout, after a hidden layer: in training y = x * m, each m either 1 / (1 - p) or,
    with probability p, 0, drawn at the step's philox.Draw with this layer's number (so every
    backend drops the same units); y = x when draw is None, in evaluation and prediction."""

    def __init__(self, backend, p, layer):
        self.backend, self.p, self.layer = backend, p, layer
        self.draw = None  # the step's philox.Draw, set by MLP.forward
        self._buffers = Buffers(backend)

    def parameters(self):
        """[]: dropout has nothing to learn."""
        return []

    def forward(self, x):
        """y = x * m, keeping m for backward; x itself without a draw."""
        if self.draw is None:
            self.mask = None
            return x
        buffer = self._buffers.get
        draw = self.draw._replace(layer=self.layer)
        y, self.mask = self.backend.dropout(
            x, self.p, draw, buffer("y", x.shape, x.dtype), buffer("m", x.shape, x.dtype)
        )
        return y

    def backward(self, grad_y):
        """grad_x = grad_y * m (grad_y itself where forward drew nothing)."""
        if self.mask is None:
            return grad_y
        return self.backend.dropout_backward(grad_y, self.mask, self._buffers.get("grad_x", grad_y.shape, grad_y.dtype))


class Sequential:
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, layers):
        self.layers = list(layers)

    def parameters(self):
        """Every layer's parameters, in order."""
        return [p for layer in self.layers for p in layer.parameters()]

    def forward(self, x):
        """Each layer's forward, first to last."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad):
        """Each layer's backward, last to first: the chain rule."""
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad
