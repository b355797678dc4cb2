"""The errors users see: the CLI prints any XpnetError's message on one line and exits 2."""


class XpnetError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class UsageError(XpnetError):
    """A command-line flag, or a combination of flags, that cannot work."""


class ConfigError(XpnetError, ValueError):
    """A training setting out of its range (a learning rate of 0, momentum without a velocity...)."""


class ArgumentError(XpnetError, ValueError):
    """An op was given arrays it cannot use: a shape, dtype or label range that does not fit."""


class BackendUnavailable(XpnetError):
    """A backend was named that does not exist or cannot run on this machine."""


class DataError(XpnetError):
    """A dataset file is missing, corrupt or not what its name promises."""


def is_interrupt(exc):
    """Whether exc is a KeyboardInterrupt, or was raised by one: one that lands while a library's
    C code runs a Python callback comes back wrapped (seen: Numba unpickling a constant, as a
    SystemError whose cause is the KeyboardInterrupt)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
