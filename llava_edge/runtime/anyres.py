"""LLaVA-NeXT "anyres" in numpy: an image becomes a grid of tiles plus an overview, and the tower's
features of those tiles become one variable-length run of image tokens.

Step for step what transformers does (LlavaNextImageProcessor, LlavaNextModel.pack_image_features):
1. the grid: of `image_grid_pinpoints` ([h, w] each), the resolution that keeps the most of the image's
   pixels after an aspect-preserving downscale, ties to the least padding (`select_best_resolution`);
2. the image is resized to fit that resolution (aspect kept, sides rounded up), centred on a black
   canvas of it, and cut into `image_size` tiles, row by row; an overview (the whole image squashed to
   `image_size` square) goes first; each tile is then normalised like a plain LLaVA image;
3. after the tower, the tiles' feature maps are stitched back into one map, the rows/columns that only
   cover the black padding are cut (`unpad`), an `image_newline` vector ends every row, and the
   overview's features go first.
The number of image tokens therefore depends on the image's size; `num_image_tokens` gives it without
running anything, so a prompt can be laid out before the vision encoder runs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..anyres_grid import grid as _grid
from ..anyres_grid import max_image_tokens, max_tiles, num_image_tokens, select_best_resolution
from ..anyres_grid import settings as _anyres
from ..anyres_grid import unpadded as _unpadded
from ..package import VisionConfig
from .preprocess import ImageError, center_crop, load_image, normalize, resize_short_side, to_rgb

__all__ = ["select_best_resolution", "image_tiles", "num_image_tokens", "pack_image_features", "encode", "max_tiles",
           "max_image_tokens"]


def _fit_size(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """The aspect-preserving size inside target (transformers' get_patch_output_size: sides rounded up)."""
    th, tw = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def _tile(rgb: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """One tile or overview (HWC uint8) -> [3,S,S] float32: the plain LLaVA steps after the tiling."""
    rgb = resize_short_side(rgb, cfg.shortest_edge, cfg.resample)
    if cfg.do_center_crop:
        rgb = center_crop(rgb, cfg.image_size)
    return normalize(rgb, cfg)


def image_tiles(image: Any, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """An image -> (pixel tiles [1 + rows*cols, 3, S, S] float32, overview first; its (height, width))."""
    rgb = to_rgb(load_image(image))
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise ImageError("image has zero size")
    s = cfg.image_size
    best = select_best_resolution((h, w), _anyres(cfg)["grid_pinpoints"])
    nh, nw = _fit_size(h, w, best)
    resized = np.array(Image.fromarray(rgb).resize((nw, nh), resample=cfg.resample))
    canvas = np.zeros((best[0], best[1], 3), dtype=np.uint8)
    top, left = (best[0] - nh) // 2, (best[1] - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    overview = np.array(Image.fromarray(rgb).resize((cfg.shortest_edge, cfg.shortest_edge), resample=cfg.resample))
    tiles = [overview] + [canvas[i : i + s, j : j + s] for i in range(0, best[0], s) for j in range(0, best[1], s)]
    return np.stack([_tile(t, cfg) for t in tiles]), (h, w)


def pack_image_features(features: np.ndarray, size: tuple[int, int], cfg: VisionConfig) -> np.ndarray:
    """One image's tile features [1 + rows*cols, side*side, D] (overview first) -> [tokens, D]."""
    side = cfg.image_size // cfg.patch_size
    n, per_tile, d = features.shape
    if per_tile != side * side:
        raise ValueError(f"anyres needs {side * side} features per tile (CLS dropped), got {per_tile}")
    gh, gw = _grid(size, cfg)
    if n != 1 + gh * gw:
        raise ValueError(f"expected {1 + gh * gw} tiles for an image of {size}, got {n}")
    grid = features[1:].reshape(gh, gw, side, side, d).transpose(0, 2, 1, 3, 4).reshape(gh * side, gw * side, d)
    rows, cols = _unpadded(size, gh * side, gw * side)
    grid = grid[rows, cols]
    newline = np.asarray(_anyres(cfg)["image_newline"], dtype=np.float32).astype(features.dtype)
    grid = np.concatenate([grid, np.broadcast_to(newline, (grid.shape[0], 1, d))], axis=1)
    return np.concatenate([features[0], grid.reshape(-1, d)], axis=0)


def encode(images: Sequence[Any], cfg: VisionConfig,
           encode_tiles: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Every image's packed features [tokens_i, D]; all tiles of all images go through one encoder call."""
    tiled = [image_tiles(im, cfg) for im in images]
    feats = encode_tiles(np.concatenate([t for t, _ in tiled]))
    out, start = [], 0
    for tiles, size in tiled:
        out.append(pack_image_features(feats[start : start + len(tiles)], size, cfg))
        start += len(tiles)
    return out
