"""Optimisers: they own the update rule and its state, and call the backend to apply it."""


class SGD:
    """Plain stochastic gradient descent: p -= lr * dL/dp for every parameter."""

    def __init__(self, backend, parameters, lr):
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.backend = backend
        self.parameters = list(parameters)
        self.lr = lr

    def step(self):
        for p in self.parameters:
            self.backend.sgd_update(p.value, p.grad, self.lr)
