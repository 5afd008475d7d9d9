"""Images from a chat request: ``data:`` URLs and files under ``--media-dir``; nothing is fetched.

Why the limits are checked before decoding: the compressed size is known from the base64 length (or the
file's fstat) and the pixel count, sample depth and shape from the image header, so an oversized upload,
a decompression bomb, a strip that pads to a huge square or a request of several 16-bit giants is refused
before it costs memory. Every failure is an ApiError (a 4xx with OpenAI's error JSON), never a 500.

URLs: the scheme is matched case-insensitively after stripping surrounding whitespace (``DATA:...;BASE64,``
is a data URL, ``HTTPS://`` is refused as remote); any other ``scheme://`` is refused too. Anything else
is a path under ``--media-dir`` (or a ``file:`` URL naming one).

Files under ``--media-dir`` are opened without a check-then-open race: the path is walked one component
at a time with ``openat`` relative to the directory already opened, every component with O_NOFOLLOW, so
swapping a directory for a symlink mid-request cannot lead outside. Consequences, on purpose:

- symbolic links inside the media directory are refused (400), even ones that stay inside it: the simple
  rule is the safe one (the directory given to ``--media-dir`` may itself be a link; it is opened once
  per request, as configured);
- ``..`` components are refused; an absolute path is accepted only under the media directory as given
  (or as resolved) and is then walked like a relative one;
- only regular files are read (a FIFO, socket or device is 400 "not a regular file"; the open is
  non-blocking so a FIFO cannot hang a worker); the size limit comes from fstat of the opened file and
  the read stops one byte past it.
Local paths need ``openat`` (``os.supports_dir_fd``) and O_NOFOLLOW: Linux and macOS; elsewhere they are
refused.

The decoded-image budget (``max_request_pixel_bytes``): each image is charged width x height x channels x
bytes per sample, read from its header before decoding, with channels at least 3 (every image becomes
RGB in preprocessing) and 16-bit samples counted as 2 bytes (32-bit as 4). The charges of one request's
images are summed in a :class:`RequestBudget` made per request (``limits.new_budget()``). The default,
256 MB, admits two images at the full default pixel limit (40M pixels of 8-bit RGB is 120 MB), or four
21M-pixel photos, but one 36M-pixel 16-bit image (216 MB) per request, not four. Over it: 413
``image_too_large`` naming the budget.

Elongated images: with ``limits.vision`` set (the package's VisionConfig), an image whose preprocessing
would make an intermediate over twice the pixel limit is refused as the CLI refuses it
(runtime/preprocess.py ``_check_work``); without it the strictest layout (padding to a square) is assumed.
Both are a 400 ``invalid_image`` before decoding, instead of a failure inside the engine later.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..errors import ImageError, ImageTooLargeError
from ..package import VisionConfig
from ..runtime.preprocess import MAX_IMAGE_PIXELS, _check_work, load_image  # _check_work: the CLI's own rule
from .protocol import ApiError

# Decoded image bytes one request may use, summed over its images (see the module docstring).
MAX_REQUEST_PIXEL_BYTES = 256 * 10**6
MAX_PATH_CHARS = 1024  # longer media paths are refused before touching the file system

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_REMOTE = {"http", "https"}


@dataclass
class RequestBudget:
    """Decoded image bytes one request has spent, against `limit` (None: no limit). One per request."""

    limit: int | None
    spent: int = 0

    def charge(self, nbytes: int, what: str) -> None:
        if self.limit is not None and self.spent + nbytes > self.limit:
            total = f"; with this request's earlier images {_mb(self.spent + nbytes)}" if self.spent else ""
            raise ApiError(413, f"image {what} decodes to {_mb(nbytes)}{total}, over the server's decoded-image "
                           f"budget of {_mb(self.limit)} per request (max_request_pixel_bytes)", "image_too_large")
        self.spent += nbytes


@dataclass
class MediaLimits:
    max_image_bytes: int = 10 * 10**6
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    max_images: int = 4
    media_dir: Path | None = None
    max_request_pixel_bytes: int | None = MAX_REQUEST_PIXEL_BYTES
    vision: VisionConfig | None = None  # the package's; makes the elongation check exactly the runtime's

    def new_budget(self) -> RequestBudget:
        """A fresh running total for one request's images."""
        return RequestBudget(self.max_request_pixel_bytes)


def load_image_url(url: str, limits: MediaLimits, budget: RequestBudget | None = None) -> Image.Image:
    """One image of a request; `budget` carries the decoded bytes spent by the request's earlier images
    (None: this image alone is checked against the budget)."""
    if not isinstance(url, str):
        raise ApiError(400, "an image URL must be a string", "invalid_image_url")
    url = url.strip()
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme == "data":
        data = _data_url_bytes(url, limits)
    elif scheme in _REMOTE or (scheme and scheme != "file" and url[m.end():].startswith("//")):
        raise ApiError(400, "remote image URLs are not fetched (the server makes no network requests): send the "
                       "image inline as a data: URL (data:image/jpeg;base64,...)", "unsupported_image_url")
    else:
        data = _local_file_bytes(url, scheme == "file", limits)
    return _decode(data, limits, budget if budget is not None else limits.new_budget())


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10**6 else f"{n} bytes"


def _too_big(limits: MediaLimits, size: int | None = None) -> ApiError:
    of = f"image of {size} bytes is" if size is not None else "image"
    return ApiError(413, f"{of} larger than the server's limit of {limits.max_image_bytes} bytes", "image_too_large")


def _data_url_bytes(url: str, limits: MediaLimits) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ApiError(400, "image data URLs must be base64: data:image/<type>;base64,<data>", "invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise _too_big(limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image's base64 data is broken: {e}", "invalid_base64") from None
    if len(data) > limits.max_image_bytes:
        raise _too_big(limits, len(data))
    return data


# -- files under --media-dir ---------------------------------------------------------------------------
def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


def _bad_name(name: str, why: str) -> ApiError:
    return ApiError(400, f"image path {_shown(name)} {why}", "invalid_image_url")


def _components(url: str, is_file_url: bool, root: Path) -> tuple[str, list[str]]:
    """(the name as given, its components relative to the media directory); refuses what cannot be one."""
    if is_file_url:
        try:
            parts = urlsplit(url)
        except ValueError:
            raise _bad_name(url, "is not a valid file: URL") from None
        if parts.netloc not in ("", "localhost"):
            raise _bad_name(url, "names another host")
        name = unquote(parts.path)
    else:
        name = url
    if not name:
        raise ApiError(400, "empty image path", "invalid_image_url")
    if len(name) > MAX_PATH_CHARS:
        raise ApiError(400, f"image path of {len(name)} characters is longer than {MAX_PATH_CHARS}",
                       "invalid_image_url")
    if "\x00" in name:
        raise _bad_name(name, "contains a NUL character")
    try:
        name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise _bad_name(name, "is not a valid file name") from None
    path = PurePosixPath(name)
    if path.is_absolute():
        for base in (root.absolute(), root.resolve()):
            if path.parts[: len(base.parts)] == base.parts:
                path = PurePosixPath(*path.parts[len(base.parts):])  # the directory itself: no parts
                break
        else:
            raise _bad_name(name, "is outside the media directory")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts:
        raise _bad_name(name, "is outside the media directory ('..' is not allowed)")
    if not parts:
        raise _bad_name(name, "is the media directory itself, not an image file")
    return name, parts


def _open_error(name: str, e: OSError) -> ApiError:
    why = {errno.ENOENT: "not found in the media directory",
           errno.ELOOP: "is or passes through a symbolic link (links are not followed in the media directory)",
           errno.ENOTDIR: "is not a file in the media directory (a part of it is not a directory)",
           errno.ENAMETOOLONG: "has a part that is too long",
           errno.EACCES: "cannot be read (permission denied)",
           errno.EPERM: "cannot be read (permission denied)"}.get(e.errno)
    return _bad_name(name, why or f"cannot be opened: {os.strerror(e.errno) if e.errno else e}")


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _local_file_bytes(url: str, is_file_url: bool, limits: MediaLimits) -> bytes:
    if limits.media_dir is None:
        raise ApiError(400, "local image paths are refused: the server was started without --media-dir; send the "
                       "image as a data: URL", "unsupported_image_url")
    if not hasattr(os, "O_NOFOLLOW") or os.open not in os.supports_dir_fd:
        raise ApiError(400, "local image paths need openat() and O_NOFOLLOW, which this system lacks; send the "
                       "image as a data: URL", "unsupported_image_url")
    root = Path(limits.media_dir)
    name, parts = _components(url, is_file_url, root)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | cloexec)
    except OSError as e:
        raise ApiError(503, f"the server's media directory cannot be opened: {os.strerror(e.errno or 0)}",
                       "media_dir_unavailable") from None
    fd = -1
    try:
        try:
            for part in parts[:-1]:
                try:
                    sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | cloexec, dir_fd=dir_fd)
                except OSError as e:  # Linux says ENOTDIR for a link here: say which it was
                    if e.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(part, dir_fd):
                        raise OSError(errno.ELOOP, "symbolic link") from None
                    raise
                os.close(dir_fd)
                dir_fd = sub
            # A cheap look first, so a device node is not even opened; fstat below is what counts.
            mode = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, "symbolic link")
            if not stat.S_ISREG(mode):
                raise _bad_name(name, "is not a regular file")
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
                         | cloexec, dir_fd=dir_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _bad_name(name, "is not a regular file")
            if st.st_size > limits.max_image_bytes:
                raise _too_big(limits, st.st_size)
            chunks, left = [], limits.max_image_bytes + 1  # the file may grow after fstat: read one byte past
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as e:
            raise _open_error(name, e) from None
        except ValueError:  # a name the OS layer cannot take (Python's own checks)
            raise _bad_name(name, "is not a valid file name") from None
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)
    data = b"".join(chunks)
    if len(data) > limits.max_image_bytes:
        raise _too_big(limits)
    return data


# -- decoding -----------------------------------------------------------------------------------------
_MODE_SAMPLE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I;16S": 2}


def _decoded_bytes(img: Image.Image) -> tuple[int, str]:
    """Bytes the image costs once decoded and made RGB (see the module docstring), and how it was counted."""
    sample = _MODE_SAMPLE_BYTES.get(img.mode, 1)
    for tile in getattr(img, "tile", None) or ():  # the raw mode says the file's sample depth (RGB;16B...)
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, tuple) and args:
            args = args[0]
        raw = args if isinstance(args, str) else ""
        if ";32" in raw:
            sample = max(sample, 4)
        elif ";16" in raw:
            sample = max(sample, 2)
    channels = max(len(img.getbands()), 3)
    w, h = img.size
    return w * h * channels * sample, f"{w}x{h} ({8 * sample}-bit, {channels} channels)"


_PAD_TO_SQUARE = SimpleNamespace(pad_to_square=True)  # no package config known: the strictest layout


def _check_shape(w: int, h: int, limits: MediaLimits) -> None:
    """The runtime's elongation rule (a 1x50000 strip pads to 2.5G pixels), as a 400 before decoding."""
    max_pixels, v = limits.max_image_pixels, limits.vision
    if max_pixels is None or w < 1 or h < 1:
        return
    try:
        if v is None or not v.anyres:  # LLaVA-NeXT tiles keep the aspect ratio inside a fixed grid: nothing grows
            _check_work(h, w, v or _PAD_TO_SQUARE, max_pixels)
    except ImageTooLargeError as e:
        raise ApiError(400, str(e), "invalid_image") from None


def _peek(data: bytes, limits: MediaLimits, budget: RequestBudget) -> bool:
    """Header checks before decoding (shape, budget); False when the header could not be read here
    (load_image then refuses the image with its own message)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                nbytes, what = _decoded_bytes(img)
    except Exception:  # noqa: BLE001 - bombs and broken headers: load_image below says which
        return False
    if limits.max_image_pixels is not None and w * h > limits.max_image_pixels:
        return False  # load_image refuses it with the pixel limit's message
    _check_shape(w, h, limits)
    budget.charge(nbytes, what)
    return True


def _decode(data: bytes, limits: MediaLimits, budget: RequestBudget) -> Image.Image:
    """The runtime's own loader (pixel limit from the header, bombs, truncated files), its errors as 4xx."""
    charged = _peek(data, limits, budget)
    try:
        img = load_image(data, limits.max_image_pixels)
    except ImageTooLargeError as e:
        raise ApiError(413, str(e), "image_too_large") from None
    except ImageError as e:
        raise ApiError(400, str(e), "invalid_image") from None
    except MemoryError:
        raise ApiError(413, "the image does not fit in the server's memory", "image_too_large") from None
    except Exception as e:  # noqa: BLE001 - whatever else untrusted bytes cause is the request's fault
        raise ApiError(400, f"cannot decode the image: {type(e).__name__}: {e}", "invalid_image") from None
    if img.width < 1 or img.height < 1:
        raise ApiError(400, "image has no pixels", "invalid_image")
    if not charged:  # the header could not be read on its own but decoding worked: charge what it is
        _check_shape(img.width, img.height, limits)
        budget.charge(*_decoded_bytes(img))
    return img
