"""xpnet: a multilayer perceptron for MNIST with hand-written backprop on swappable array backends."""

__version__ = "0.1.0"
