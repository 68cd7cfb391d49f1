"""The one base class for bad input, and the two shapes it takes at plain raise sites.

Every error a user can fix by changing a file or a setting derives from :class:`InputError`; its
message names the file (or setting) and the problem. The CLI maps it, and only it, to exit status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(Exception):
    """Bad input: a missing or malformed file, a bad setting, a stage run out of order."""


class InputValueError(InputError, ValueError):
    """A file or setting holds a value the pipeline cannot use."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A file or stage output the pipeline needs does not exist."""
