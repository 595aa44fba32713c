"""Ge fbcd: median-filtered BCDs (temporal per-pixel median and column median removed)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def median_filter_group(
    images: Sequence[np.ndarray],
    usable: Sequence[np.ndarray],
    *,
    temporal: bool = True,
    column: bool = True,
) -> list[np.ndarray]:
    """Background-subtracted copies of the BCDs of one AOR+channel group (MJy/sr).

    First each pixel's median over the group (only where `usable`) is subtracted: that removes
    the sky and the slowly varying pixel offsets, while point sources, which move between
    dithers, survive. Then each column's median (usable pixels) is removed from every frame,
    taking out the column-correlated residuals of the Ge readout. Unusable pixels carry NaN
    in the filter estimates and are left as the BCD minus whatever could be estimated.
    """
    stack = np.stack([np.asarray(im, dtype=np.float64) for im in images])
    ok = np.stack([np.asarray(u, dtype=bool) for u in usable]) & np.isfinite(stack)
    masked = np.where(ok, stack, np.nan)
    out = stack.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN: handled
        if temporal and stack.shape[0] > 1:
            pixel_median = np.nan_to_num(np.nanmedian(masked, axis=0))
            out -= pixel_median[None, :, :]
            masked = masked - pixel_median[None, :, :]
        if column:
            col_median = np.nan_to_num(np.nanmedian(masked, axis=1))  # (n, ncols)
            out -= col_median[:, None, :]
    return [frame.astype(np.float32) for frame in out]
