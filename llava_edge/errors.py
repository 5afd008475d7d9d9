"""The base of every error a user can cause, so the CLI can tell them from bugs.

The CLI turns a :class:`LlavaEdgeError` into a one-line ``error:`` and exit code 2 and lets every other
exception through with its traceback (a bug in numpy, onnx or our code must stay debuggable). Each stage
subclasses it where a caller needs to tell errors apart (``PackageError``, ``BackendError``,
``QuantizeError``, ...). It subclasses ``ValueError`` so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["LlavaEdgeError", "UsageError"]


class LlavaEdgeError(ValueError):
    """Something the user asked for cannot be done; the message says what to change."""


class UsageError(LlavaEdgeError):
    """Bad input: a flag, a prompt, a setting or a file the user gave."""
