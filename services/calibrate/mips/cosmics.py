"""24 um cosmic rays: flag (not remove) single-pixel spatial outliers sharper than the PSF."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from services.calibrate.mips.steps import COMPLETE, StepRecord


def flag_radhits(
    image: np.ndarray,
    unc: np.ndarray,
    ignore: np.ndarray,
    unusable_neighbour: np.ndarray,
    *,
    nsigma: float,
    neighbour_ratio: float,
    background_box_px: int,
) -> tuple[np.ndarray, StepRecord]:
    """Boolean map of radiation hits on one calibrated 24 um frame (any linear unit).

    A pixel is a hit when its excess over the local background (median in a
    `background_box_px` box) is above `nsigma` times the local background uncertainty (median
    of `unc` in the same box, so a hit's own Poisson noise does not hide it) and above
    `neighbour_ratio` times the excess of its brightest direct neighbour. The second test
    keeps point sources: a pixel-integrated PSF of FWHM 2.3 px puts >= 0.6 of its peak
    pixel's excess into the brightest neighbour, a cosmic ray puts nearly nothing there.
    Pixels in `ignore` (pmask, saturated) are not flagged; pixels in `unusable_neighbour` (pmask)
    are not flagged and count as background when they are a neighbour.
    """
    img = np.where(unusable_neighbour | ~np.isfinite(image), np.nan, image)
    filled = np.where(np.isfinite(img), img, np.nanmedian(img) if np.isfinite(img).any() else 0.0)
    background = ndimage.median_filter(filled, size=background_box_px, mode="reflect")
    sigma = ndimage.median_filter(
        np.where(np.isfinite(unc), unc, np.nanmedian(unc)), size=background_box_px, mode="reflect"
    )
    excess = filled - background
    # a bad pixel (pmask, no uncertainty) counts as background (excess 0) for its neighbours:
    # a source core on a dead pixel still leaves >= 2 bright pixels around each wing pixel;
    # saturated pixels keep their (large) value
    excess_nb = np.where(unusable_neighbour, 0.0, excess)
    padded = np.pad(excess_nb, 1, mode="constant", constant_values=-np.inf)
    neighbour_max = np.maximum.reduce(
        [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    )
    significant = excess > nsigma * sigma
    sharp = excess > neighbour_ratio * np.maximum(neighbour_max, 0.0)
    hits = significant & sharp & ~ignore & ~unusable_neighbour & np.isfinite(img)
    lines = (
        f"CRFLAG: spatial, nsigma {nsigma:g}, neighbour ratio {neighbour_ratio:g}, "
        f"box {background_box_px} px: {int(hits.sum())} radiation hits flagged",
    )
    return hits, StepRecord("CRFLAG", COMPLETE, lines, cards={"NRADHIT": (int(hits.sum()), "")})
