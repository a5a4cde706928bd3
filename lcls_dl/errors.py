"""Errors that lcls-dl reports to a user as one line.

Library code raises :class:`LclsError` (or a subclass) for anything a user can fix:
bad input, missing files, mismatched configurations. The CLI prints it as
``lcls-dl: error: <what> (<where>)`` and exits 1; any other exception is a bug and
is printed the same way, with a traceback only under ``--verbose``.
"""


class LclsError(Exception):
    """A failure a user can act on.

    Parameters
    ----------
    what : str
        What went wrong, e.g. ``"frame contains NaN"``.
    where : str, optional
        Where: a file, ``file:event``, a dataset path, a rank.

    Examples
    --------
    >>> str(LclsError("no labeled frames", "data/run1"))
    'no labeled frames (data/run1)'
    """

    exit_code = 1

    def __init__(self, what, where=None):
        self.what = str(what)
        self.where = None if where is None else str(where)
        super().__init__(self.what if self.where is None else f"{self.what} ({self.where})")


class InputError(LclsError):
    """Input data is missing, malformed or inconsistent."""


class ConfigError(LclsError):
    """Two configurations disagree (dataset vs model, checkpoint vs run)."""
