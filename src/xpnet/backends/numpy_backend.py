"""The reference backend: the base class with xp = numpy, adding nothing."""

from xpnet.backends.base import Backend


class NumpyBackend(Backend):
    name = "numpy"
