"""The one error type users see: the CLI prints its message on one line and exits 2."""


class XpnetError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class BackendUnavailable(XpnetError):
    """A backend was named that does not exist or cannot run on this machine."""


class DataError(XpnetError):
    """A dataset file is missing, corrupt or not what its name promises."""
