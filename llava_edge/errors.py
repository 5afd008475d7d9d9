"""The exception types that mean "the user asked for something that cannot be done".

Why types of our own: the CLI turns these into a one-line ``error:`` and exit code 2, and lets every
other exception through with its traceback. Catching plain ``ValueError`` there would also turn
genuine bugs inside numpy, onnx or our own code into a tidy one-liner nobody could debug.
``UsageError`` subclasses ``ValueError`` so Python callers that catch ``ValueError`` keep working;
the classes below it let a caller (the server, a test) tell the kinds apart.
"""

from __future__ import annotations

__all__ = ["UsageError", "OutputError", "ImageError", "ImageTooLargeError", "TextInputError", "Terminated"]


class UsageError(ValueError):
    """Bad input: a flag, a prompt, a setting or a file the user gave; the message says what to change."""


class OutputError(UsageError):
    """An output location that cannot or must not be written: read-only, a file where a directory
    belongs, or a directory holding something that is not ours to replace."""


class ImageError(UsageError):
    """The image cannot be read or decoded."""


class ImageTooLargeError(ImageError):
    """The image header declares more pixels than the configured limit (checked before decoding)."""


class TextInputError(UsageError):
    """A prompt or chat line that is not text: invalid UTF-8, bytes instead of str, empty."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program was, so staging directories are cleaned as for Ctrl-C.

    Not an error: a KeyboardInterrupt subclass, so every ``except BaseException`` cleanup path that
    handles Ctrl-C handles a ``kill`` the same way."""
