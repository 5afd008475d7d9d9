"""Image preprocessing in numpy + PIL, step for step what transformers' CLIP/LLaVA processors do.

Why bit-for-bit: the vision tower was trained on exactly these pixels; a different resize filter or
rounding shifts the features and, at 4 bits, the answers. Order (as transformers' PIL backend):
convert to RGB (alpha composited on white), [LLaVA-1.5: pad to square with the mean colour],
resize the short side (PIL, bicubic), centre crop, rescale (float64 then float32), normalise.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageError, ImageTooLargeError  # noqa: F401 - importable from here, as before
from ..package import VisionConfig

# Largest image decoded, in pixels (width x height), read from the header before any decoding: 40M is a
# 7700x5200 photo (120 MB as RGB). The tower sees a few hundred pixels a side, so more only costs memory
# and time; a 90 KB PNG can declare 400M pixels (a decompression bomb). CLI: --max-image-pixels.
MAX_IMAGE_PIXELS = 40_000_000


def _name(source) -> str:
    """The image as messages name it: its path, or "data" for bytes (never a repr: "image data is ...")."""
    return "data" if isinstance(source, (bytes, bytearray)) else str(source)


def _reason(e: Exception) -> str:
    """An exception's text without object reprs (PIL says "cannot identify image file <_io.BytesIO object
    at 0x7f...>" about bytes)."""
    text = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(e)).strip()
    return text or type(e).__name__


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f}M pixels" if n >= 100_000 else f"{n} pixels"


def _check_pixels(size: tuple[int, int], source, max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"image {_name(source)} is {w}x{h} ({_pixels(w * h)}), over the limit of "
                                 f"{_pixels(max_pixels)} (raise it with --max-image-pixels)")


def load_image(source: str | os.PathLike | bytes | Image.Image | np.ndarray,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or an HWC uint8 array.

    Files and bytes are checked against `max_pixels` (None: no limit) from the header, before any pixel
    is decoded; an image already in memory (PIL, numpy) is taken as it is. PIL's own bomb check stays as
    a backstop (it refuses over twice its limit) and its warning is never printed.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if (source.dtype != np.uint8 or source.ndim not in (2, 3)
                or (source.ndim == 3 and source.shape[2] not in (1, 3, 4))):
            raise ImageError("arrays must be uint8 HxW or HxWxC with C in 1, 3, 4")
        return Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    if not isinstance(source, (bytes, bytearray, str, os.PathLike)):
        raise ImageError(f"an image must be a path, bytes, a PIL image or a numpy array, not {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray)):
                img = Image.open(io.BytesIO(source))
            else:
                path = Path(source)
                if path.is_dir():
                    raise ImageError(f"{path} is a directory, not an image file")
                if not path.is_file():
                    raise ImageError(f"image {path} is not a regular file" if path.exists() else
                                     f"image not found: {path}")
                img = Image.open(path)
            _check_pixels(img.size, source, max_pixels)
            img.load()  # decode now: a truncated file must fail here, not inside preprocessing
        return img
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"image {_name(source)} declares too many pixels to decode (a decompression bomb?); "
                                 f"the limit is {_pixels(max_pixels or 0)}") from None
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL parsing untrusted bytes: whatever it raises, the file is bad
        raise ImageError(f"cannot decode image {_name(source)}: {_reason(e)}") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8-bit "L", scaled (PIL's own convert clips to 255)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535
                                       and a.max() > 255):  # 16-bit PNGs open as "I"
        # rint(x / 257) in integers: (2x + 257) // 514 (no ties), a quarter of float64's memory and time
        return Image.fromarray(((a.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8), "L")
    if img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
        return Image.fromarray(a.astype(np.uint8), "L")
    if img.mode == "F" and a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
        scaled = a.astype(np.float64) * 255.0
    else:  # anything else: stretch its own range
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> np.ndarray:
    """HWC uint8 RGB. Transparency is composited on white, as transformers' convert_to_rgb does."""
    try:
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.array(img.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ImageError(f"unsupported image mode {img.mode!r}: {e}") from None


def pad_to_square(rgb: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    h, w, _ = rgb.shape
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=rgb.dtype)
    out[:] = np.array(color, dtype=rgb.dtype)
    if w > h:
        top = (side - h) // 2
        out[top : top + h] = rgb
    else:
        left = (side - w) // 2
        out[:, left : left + w] = rgb
    return out


def resize_short_side(rgb: np.ndarray, size: int, resample: int) -> np.ndarray:
    h, w, _ = rgb.shape
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return np.array(Image.fromarray(rgb).resize((new_w, new_h), resample=resample))


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w, _ = rgb.shape
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        return rgb[top : top + size, left : left + size]
    # Smaller than the crop: zero-pad around it, centred (transformers' rule).
    out = np.zeros((max(h, size), max(w, size), 3), dtype=rgb.dtype)
    top, left = -(-(out.shape[0] - h) // 2), -(-(out.shape[1] - w) // 2)
    out[top : top + h, left : left + w] = rgb
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


def _check_work(h: int, w: int, cfg: VisionConfig, max_pixels: int | None) -> None:
    """The largest intermediate an image of h x w makes (the padded square, or the short side resized
    with a long side to match) must fit twice the pixel limit (room for a 16:9 photo at the limit): a
    1x20000 strip is 20000 pixels but pads to 400M."""
    if max_pixels is None:
        return
    if cfg.pad_to_square:
        side = max(h, w)
        work, what = side * side, f"padded to a square it is {side}x{side}"
    else:
        short, long = min(h, w), max(h, w)
        work, what = cfg.shortest_edge * cfg.shortest_edge * long // short, "resized it is"
    if work > 2 * max_pixels:
        raise ImageTooLargeError(f"image {w}x{h} is too elongated: {what} {_pixels(work)}, over twice the "
                                 f"limit of {_pixels(max_pixels)} (crop it, or raise --max-image-pixels)")


def preprocess(image, cfg: VisionConfig, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image -> pixel_values [3, S, S] float32."""
    img = load_image(image, max_pixels)
    if img.width == 0 or img.height == 0:
        raise ImageError("image has zero size")
    _check_work(img.height, img.width, cfg, max_pixels)
    rgb = to_rgb(img)
    if cfg.pad_to_square:
        rgb = pad_to_square(rgb, tuple(int(m * 255) for m in cfg.image_mean))
    if cfg.resize == "square":  # SigLIP: straight to SxS, aspect not kept
        rgb = np.array(Image.fromarray(rgb).resize((cfg.image_size, cfg.image_size), resample=cfg.resample))
    else:
        rgb = resize_short_side(rgb, cfg.shortest_edge, cfg.resample)
    if cfg.do_center_crop:
        rgb = center_crop(rgb, cfg.image_size)
    return normalize(rgb, cfg)


def normalize(rgb: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """HWC uint8 -> CHW float32: rescale (in float64, as transformers), then (x - mean) / std."""
    chw = np.moveaxis(rgb, -1, 0)
    x = (chw.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.array(cfg.image_mean, dtype=np.float32)
    std = np.array(cfg.image_std, dtype=np.float32)
    return ((x.T - mean) / std).T


def preprocess_batch(images, cfg: VisionConfig, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    return np.stack([preprocess(im, cfg, max_pixels) for im in images])
