"""Files the user names on the command line: written whole or not at all, read only when regular.

* :func:`atomic_output` / :func:`write_atomic`: an output file (``eval -o``, ``bench -o/--md/--plot``)
  is written to a temporary file next to it, fsynced and renamed over it, so a full disk, a read-only
  mount or Ctrl-C never leaves a partial or empty file; the error is one line, ``cannot write PATH:
  No space left on device``. A special file (``/dev/null``, a FIFO, ``/dev/stdout``) is written in place.
* :func:`check_regular_file`: an input that is a device or a FIFO (``--json-schema /dev/zero``) is
  refused by name before anything reads it forever; :func:`check_size` also caps the size (1 MB for
  a schema).
* :func:`display`: a path or message as text that prints anywhere (undecodable bytes of a file name,
  kept by Python as lone surrogates, shown as ``\\xff``), so an error about such a name is not a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError, UsageError

__all__ = ["WRITE_ERRNOS", "atomic_output", "write_atomic", "write_error", "check_regular_file", "check_size",
           "display", "encode_text", "SCHEMA_MAX_BYTES"]

# errnos that mean "the place cannot take the bytes", whatever the writer was: a full disk or quota, a
# read-only mount, a failing device, a file over the size limit
WRITE_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", None), errno.EIO,
                                     errno.EFBIG) if e is not None)
SCHEMA_MAX_BYTES = 1 << 20  # a JSON schema is a few KB; 1 MB is generous and bounds a runaway read


def display(text: str | bytes | os.PathLike) -> str:
    """`text` (a path or a message) as a str that encodes anywhere: a file name's undecodable bytes
    (surrogateescape) become ``\\xNN``, any other lone surrogate ``\\udNNN``."""
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    elif isinstance(text, os.PathLike):
        text = os.fsdecode(os.fspath(text))
    else:
        text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate outside the escape range: not from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def encode_text(text: str) -> bytes:
    """UTF-8; a file name's undecodable bytes (surrogateescape) go back as the bytes they were."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def write_error(path: str | os.PathLike, e: BaseException) -> OutputError:
    """The one-line error for a failed write of `path`."""
    if isinstance(e, OSError):
        why = e.strerror or str(e) or type(e).__name__
    elif isinstance(e, UnicodeError):
        why = f"cannot encode the text ({e.reason})" if hasattr(e, "reason") else str(e)
    else:
        why = str(e) or type(e).__name__
    return OutputError(f"cannot write {display(path)}: {display(why)}")


def _kind(mode: int) -> str | None:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _mode_for(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)  # replacing a file keeps its permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory (same suffix, so writers that pick a format by
    extension still do); when the block ends without error it is fsynced and renamed over `path`. On
    any error, Ctrl-C included, the temporary file is removed; an OSError or an encoding error becomes
    ``OutputError("cannot write PATH: <reason>")``. A `path` that exists and is not a regular file
    (``/dev/null``, a FIFO) is yielded as it is and written in place; a symlink is followed."""
    path = Path(path)
    try:
        target = Path(os.path.realpath(path)) if path.is_symlink() else path
        st = os.stat(target) if target.exists() else None
    except OSError as e:
        raise write_error(path, e) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{display(path)} is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            yield target
        except (OSError, UnicodeError) as e:
            raise write_error(path, e) from None
        return
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.partial-{os.getpid()}-",
                                    suffix=target.suffix)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
        tmp = None
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, (OSError, UnicodeError)):
            raise write_error(path, e) from None
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` whole or not at all; see :func:`atomic_output`."""
    payload = encode_text(data) if isinstance(data, str) else bytes(data)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
    return Path(path)


def check_regular_file(path: str | os.PathLike, what: str) -> None:
    """Refuse an input that exists and is a device, a FIFO or a socket: reading /dev/zero never ends
    and opening a FIFO blocks. A missing file or a directory is left to the reader (its own "not
    found" / "is a directory" message). `what` names it in the error, e.g. ``--json-schema``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"cannot read {what} {display(path)}: {display(e.strerror or e)}") from None
    kind = _kind(st.st_mode)
    if kind is not None and not stat.S_ISDIR(st.st_mode):  # a directory: the reader names it already
        raise UsageError(f"{what} {display(path)} is not a regular file ({kind})")


def check_size(path: str | os.PathLike, what: str, limit: int = SCHEMA_MAX_BYTES) -> None:
    """A regular file (see :func:`check_regular_file`) of at most `limit` bytes, by its size on disk."""
    check_regular_file(path, what)
    try:
        st = os.stat(path)
    except OSError:
        return  # missing: the reader says so
    if stat.S_ISREG(st.st_mode) and st.st_size > limit:
        size = st.st_size
        raise UsageError(f"{what} {display(path)} is {_size(size)}, over the limit of {_size(limit)}")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"
