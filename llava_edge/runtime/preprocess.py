"""Image preprocessing in numpy + PIL, step for step what transformers' CLIP/LLaVA processors do.

Why bit-for-bit: the vision tower was trained on exactly these pixels; a different resize filter or
rounding shifts the features and, at 4 bits, the answers. Order (as transformers' PIL backend):
convert to RGB (alpha composited on white), [LLaVA-1.5: pad to square with the mean colour],
resize the short side (PIL, bicubic), centre crop, rescale (float64 then float32), normalise.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import LlavaEdgeError
from ..package import VisionConfig


class ImageError(LlavaEdgeError):
    """The image cannot be read or decoded."""


def load_image(source: str | os.PathLike | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or an HWC uint8 array."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageError("arrays must be uint8 HxW or HxWxC")
        return Image.fromarray(source)
    try:
        if isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"image not found: {path}")
            img = Image.open(path)
        img.load()  # decode now: a truncated file must fail here, not inside preprocessing
        return img
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot decode image {source if not isinstance(source, bytes) else '<bytes>'}: {e}") from None


def to_rgb(img: Image.Image) -> np.ndarray:
    """HWC uint8 RGB. Transparency is composited on white, as transformers' convert_to_rgb does."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(img.convert("RGB"))


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
    t, l = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[t : t + size, l : l + size]


def preprocess(image, cfg: VisionConfig) -> np.ndarray:
    """One image -> pixel_values [3, S, S] float32."""
    rgb = to_rgb(load_image(image))
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError("image has zero size")
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


def preprocess_batch(images, cfg: VisionConfig) -> np.ndarray:
    return np.stack([preprocess(im, cfg) for im in images])
