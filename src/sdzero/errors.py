"""The one base class of errors a user can cause and fix (no heavy imports: every layer may use it).

``sdzero`` prints a :class:`UserError` as ``sdzero: error: <message>`` and exits with status 2; any
other exception is a bug and keeps its traceback. The message names the file or config key at fault
and what was expected there.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message names the key or file and what was expected."""


class ConfigError(UserError, ValueError):
    """A config value, key or file is wrong; the message names the key or file.

    Also a ``ValueError``: a setting's own checks raise ``ValueError`` and callers catch either.
    """


class InputError(UserError, ValueError):
    """A command-line input (an image file, a query point, a class name) is unusable; the message
    names the argument and what was expected."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that a config key or argument points at is missing or empty; the message
    names the key (or argument), the path and what was expected there."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a chosen setting needs is not installed; the message names the setting
    and how to install it."""
