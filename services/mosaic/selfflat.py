"""Self-flat: a flat field made from the science frames themselves (MOPEX flatfield.pl idea).

Each frame is divided by its own median background; pixels on sources (above the
background by `source_sigma` robust sigma) and invalid pixels are masked; the median over
frames of the normalised stack, normalised to median 1, is the flat. Dividing the frames by
it removes residual flat-field structure and latents (SSC MIPS-24 cookbook, seed 001).
"""

from __future__ import annotations

import warnings

import numpy as np


class SelfFlatError(ValueError):
    """The frames cannot make a self-flat (too few, or of different shapes)."""


def make_self_flat(
    data: list[np.ndarray],
    valid: list[np.ndarray],
    *,
    source_sigma: float = 3.0,
    min_frames: int = 5,
) -> np.ndarray:
    """Flat field (median 1, float32, NaN where no frame had a valid background pixel).

    `data` are surface-brightness frames of one shape, `valid` their usable-pixel masks.
    Needs at least `min_frames` frames: with fewer, sources dithered over a pixel would not
    be masked out of its median.
    """
    if len(data) < min_frames:
        raise SelfFlatError(
            f"self-flat needs at least {min_frames} frames, got {len(data)}; "
            "switch self_flat off for this data set"
        )
    shapes = {d.shape for d in data}
    if len(shapes) != 1:
        raise SelfFlatError(f"self-flat needs frames of one shape, got {sorted(shapes)}")
    stack = np.stack([np.where(v, d, np.nan) for d, v in zip(data, valid, strict=True)])
    with warnings.catch_warnings():
        # all-NaN frames or pixels are expected (bad pixels, dead frames): they stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        level = np.nanmedian(stack, axis=(1, 2))
        spread = 1.4826 * np.nanmedian(np.abs(stack - level[:, None, None]), axis=(1, 2))
        good_frame = np.isfinite(level) & (np.abs(level) > 0)
        stack = stack[good_frame]
        level = level[good_frame]
        spread = spread[good_frame]
        source = stack > (level + source_sigma * spread)[:, None, None]
        norm = np.where(source, np.nan, stack / level[:, None, None])
        flat = np.nanmedian(norm, axis=0)
        flat /= np.nanmedian(flat)
    return flat.astype(np.float32)
