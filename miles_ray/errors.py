"""The one exception family for problems in what the user gave us.

A :class:`UserError` (bad config key or value, unusable data, a model path that is not a model, a
reward function that does not import, a resume folder that is not a checkpoint) is reported by the
CLI as one message and a non-zero exit, without a traceback (``--debug`` shows it). Everything else
is a bug or an infrastructure failure and keeps its traceback.

Subclasses also derive from the built-in type a caller would expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the field (or row, or file) and the fix."""


class UserValueError(UserError, ValueError):
    """A value the user gave is wrong (a config value, a reward-function spec, a model spec)."""


class UserPathError(UserError, FileNotFoundError):
    """A path the user gave does not hold what it should (model folder, checkpoint folder)."""
