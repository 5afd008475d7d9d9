"""Images from a chat request: ``data:`` URLs and files under ``--media-dir``; nothing is fetched.

Why the limits are checked before decoding: the compressed size is known from the base64 length and
the pixel count from the image header, so an oversized upload or a decompression bomb is refused
before it costs memory. Every failure is an ApiError (a 4xx with OpenAI's error JSON).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import ImageError, ImageTooLargeError
from ..runtime.preprocess import MAX_IMAGE_PIXELS, load_image
from .protocol import ApiError


@dataclass
class MediaLimits:
    max_image_bytes: int = 10 * 10**6
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images: int = 4
    media_dir: Path | None = None


def load_image_url(url: str, limits: MediaLimits) -> Image.Image:
    if url.startswith("data:"):
        data = _data_url_bytes(url, limits)
    elif url.startswith(("http://", "https://")):
        raise ApiError(400, "remote image URLs are not fetched (the server makes no network requests): send the "
                       "image inline as a data: URL (data:image/jpeg;base64,...)", "unsupported_image_url")
    else:
        data = _local_file_bytes(url, limits)
    return _decode(data, limits)


def _data_url_bytes(url: str, limits: MediaLimits) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(400, "image data URLs must be base64: data:image/<type>;base64,<data>", "invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, f"image larger than the server's limit of {limits.max_image_bytes} bytes",
                       "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image's base64 data is broken: {e}", "invalid_base64") from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"image of {len(data)} bytes is larger than the server's limit of "
                       f"{limits.max_image_bytes} bytes", "image_too_large")
    return data


def _local_file_bytes(url: str, limits: MediaLimits) -> bytes:
    if limits.media_dir is None:
        raise ApiError(400, "local image paths are refused: the server was started without --media-dir; send the "
                       "image as a data: URL", "unsupported_image_url")
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    root = limits.media_dir.resolve()
    path = (root / raw).resolve()  # an absolute raw path replaces root; the check below still applies
    if not path.is_relative_to(root):
        raise ApiError(400, f"image path {raw!r} is outside the media directory", "invalid_image_url")
    if not path.is_file():
        raise ApiError(400, f"image file {raw!r} not found in the media directory", "invalid_image_url")
    if path.stat().st_size > limits.max_image_bytes:
        raise ApiError(413, f"image larger than the server's limit of {limits.max_image_bytes} bytes",
                       "image_too_large")
    return path.read_bytes()


def _decode(data: bytes, limits: MediaLimits) -> Image.Image:
    """The runtime's own loader (pixel limit from the header, bombs, truncated files), its errors as 4xx."""
    try:
        img = load_image(data, limits.max_image_pixels)
    except ImageTooLargeError as e:
        raise ApiError(413, str(e), "image_too_large") from None
    except ImageError as e:
        raise ApiError(400, str(e), "invalid_image") from None
    except Exception as e:  # noqa: BLE001 - whatever else untrusted bytes cause is the request's fault
        raise ApiError(400, f"cannot decode the image: {type(e).__name__}: {e}", "invalid_image") from None
    if img.width < 1 or img.height < 1:
        raise ApiError(400, "image has no pixels", "invalid_image")
    return img
