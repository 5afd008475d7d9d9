"""LLaVA-NeXT "anyres" grid arithmetic: which grid an image of a given size is tiled into, and how many
tiles and image tokens that makes, from the package's vision config alone (no pixels, no numpy).

The runtime lays out prompts with it (``runtime/anyres.py`` tiles the pixels and re-exports these), the
quantizer counts calibration tokens with it, and the TensorRT stage sizes engine profiles with it, so it
sits outside both the runtime and the TensorRT stage (which never import each other).
"""

from __future__ import annotations

from typing import Any, Sequence

from .package import VisionConfig

__all__ = ["select_best_resolution", "settings", "grid", "unpadded", "num_image_tokens", "max_tiles",
           "max_image_tokens"]


def select_best_resolution(original_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint that keeps the most image pixels, then wastes the fewest."""
    oh, ow = original_size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def settings(cfg: VisionConfig) -> dict[str, Any]:
    """The vision config's anyres settings (grid_pinpoints, image_newline); a ValueError without them."""
    if not cfg.anyres:
        raise ValueError("this package's vision config has no anyres settings (not a LLaVA-NeXT package)")
    return cfg.anyres


def grid(size: tuple[int, int], cfg: VisionConfig) -> tuple[int, int]:
    """(rows, columns) of tiles an image of (height, width) is cut into."""
    bh, bw = select_best_resolution(size, settings(cfg)["grid_pinpoints"])
    return bh // cfg.image_size, bw // cfg.image_size


def unpadded(size: tuple[int, int], height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of a [height, width] feature map that cover the image, not the padding."""
    oh, ow = size
    if ow / oh > width / height:
        new_h = int(round(oh * (width / ow), 7))
        pad = (height - new_h) // 2
        return slice(pad, height - pad), slice(0, width)
    new_w = int(round(ow * (height / oh), 7))
    pad = (width - new_w) // 2
    return slice(0, height), slice(pad, width - pad)


def num_image_tokens(size: tuple[int, int], cfg: VisionConfig) -> int:
    """Image tokens of an image of (height, width): overview + unpadded grid + one newline per row."""
    side = cfg.image_size // cfg.patch_size
    gh, gw = grid(size, cfg)
    rows, cols = unpadded(size, gh * side, gw * side)
    n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
    return cfg.num_image_tokens + n_rows * (n_cols + 1)


def max_tiles(cfg: VisionConfig) -> int:
    """Most vision-encoder inputs one image can take (1 without anyres): engine profiles are sized by it."""
    if not cfg.anyres:
        return 1
    s = cfg.image_size
    return 1 + max((h // s) * (w // s) for h, w in cfg.anyres["grid_pinpoints"])


def max_image_tokens(cfg: VisionConfig) -> int:
    """Most image tokens one image can take: an image of a pinpoint's exact shape (nothing unpadded);
    2,928 for LLaVA-1.6's 336 px grid."""
    if not cfg.anyres:
        return cfg.num_image_tokens
    return max(num_image_tokens((h, w), cfg) for h, w in cfg.anyres["grid_pinpoints"])
