"""The one exception type that means "the user asked for something that cannot be done".

Why a type of our own: the CLI turns these into a one-line ``error:`` and exit code 2, and lets every
other exception through with its traceback. Catching plain ``ValueError`` there (as it once did) also
turned genuine bugs inside numpy, onnx or our own code into a tidy one-liner nobody could debug.
``UsageError`` subclasses ``ValueError`` so Python callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input: a flag, a prompt, a setting or a file the user gave; the message says what to change."""
