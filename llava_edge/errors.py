"""The base of every error a user can cause, so the CLI can tell them from bugs.

The CLI turns a :class:`LlavaEdgeError` into a one-line ``error:`` and exit code 2 and lets every other
exception through with its traceback (a bug in numpy, onnx or our code must stay debuggable). Each stage
subclasses it where a caller needs to tell errors apart (``PackageError``, ``BackendError``,
``QuantizeError``, ...); the server maps them to 4xx answers. It subclasses ``ValueError`` so callers
that catch ``ValueError`` keep working. docs/errors.md lists every case and the line it prints.
"""

from __future__ import annotations

__all__ = ["LlavaEdgeError", "UsageError", "OutputError", "ImageError", "ImageTooLargeError", "TextInputError",
           "BackendError", "Terminated"]


class LlavaEdgeError(ValueError):
    """Something the user asked for cannot be done; the message says what to change."""


class UsageError(LlavaEdgeError):
    """Bad input: a flag, a prompt, a setting or a file the user gave."""


class OutputError(UsageError):
    """An output location that cannot or must not be written: read-only, a file where a directory
    belongs, or a directory holding something that is not ours to replace."""


class ImageError(UsageError):
    """The image cannot be read or decoded."""


class ImageTooLargeError(ImageError):
    """The image header declares more pixels than the configured limit (checked before decoding)."""


class TextInputError(UsageError):
    """A prompt or chat line that is not text: invalid UTF-8, bytes instead of str, empty."""


class BackendError(LlavaEdgeError):
    """A backend cannot run this package or request (missing engine, cache full, no GPU, ...).

    Here, not in the runtime, because the engine contract and trt_env (shared by the TensorRT builder
    and the runtime) subclass it; ``runtime/backend.py`` re-exports it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program was, so staging directories are cleaned as for Ctrl-C.

    Not an error: a KeyboardInterrupt subclass, so every ``except BaseException`` cleanup path that
    handles Ctrl-C handles a ``kill`` the same way."""
