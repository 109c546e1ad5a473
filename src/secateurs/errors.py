"""Exceptions a user can act on. The CLI turns each into one line and exit status 2."""


class SecateursError(Exception):
    """Base class: a user's mistake or an input secateurs cannot work with."""


class InvalidArgument(SecateursError, ValueError):
    """An argument has a value outside what the function accepts."""


class MissingData(SecateursError):
    """A data-aware criterion was asked for without calibration data or a loss."""


class IncompatibleLayer(SecateursError):
    """A selected layer cannot be pruned the way that was asked (e.g. N:M width)."""


class WeightsMismatch(SecateursError):
    """A weights file does not fit the model it is loaded into."""


class FileProblem(SecateursError):
    """A file is missing, unreadable, unsafe to load, or would overwrite an input."""
