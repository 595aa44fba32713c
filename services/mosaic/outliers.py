"""Temporal outlier rejection: sigma-clip the stack of frames at each output pixel.

Each input pixel is assigned to the output pixel its footprint centre falls in; at every
output pixel with coverage >= `min_coverage` the median of the stack is the reference. A
sample is an outlier when |value - median| > sigma * sqrt(unc^2 * (1 + pi/2n) + (frac *
deriv)^2), where deriv is the largest difference between the median image and its 8
neighbours (the JWST blot-derivative idea): on a bright, undersampled point source the
samples of one output pixel legitimately differ by about that much (sub-pixel phase), so
sources are not clipped while cosmic rays on flat sky are. Rejected samples go back to the
input frames' rmask.
"""

from __future__ import annotations

import numpy as np

from services.mosaic.overlap import group_medians
from services.mosaic.resample import Samples


def _neighbour_derivative(median: np.ndarray) -> np.ndarray:
    """Largest |median - neighbour| over the 8 neighbours (NaN neighbours ignored)."""
    ny, nx = median.shape
    padded = np.pad(median, 1, constant_values=np.nan)
    deriv = np.zeros_like(median)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = padded[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
            diff = np.abs(median - nb)
            deriv = np.fmax(deriv, np.where(np.isfinite(diff), diff, 0.0))
    return deriv


def find_outliers(
    samples: Samples,
    *,
    grid_shape: tuple[int, int],
    sigma: float = 4.0,
    frac: float = 0.5,
    min_coverage: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean per sample (True = outlier) and the median image used as reference.

    `sigma` is the clipping threshold in units of the combined scale; `frac` the fraction of
    the local derivative tolerated (PSF undersampling, gradients inside an output pixel);
    `min_coverage` the least number of samples an output pixel needs to be judged at all.
    """
    rejected = np.zeros(samples.size, dtype=bool)
    median_img = np.full(grid_shape, np.nan)
    if samples.size == 0:
        return rejected, median_img
    pix = samples.output_pixel(grid_shape)
    upix, med, counts, inverse = group_medians(pix, samples.value)
    judged = counts >= min_coverage
    median_img.ravel()[upix[judged]] = med[judged]
    deriv = _neighbour_derivative(median_img)
    n = counts[inverse]
    ref = med[inverse]
    unc = samples.unc.astype(np.float64)
    scale2 = unc**2 * (1.0 + 0.5 * np.pi / np.maximum(n, 1)) + (frac * deriv.ravel()[pix]) ** 2
    resid = samples.value.astype(np.float64) - ref
    rejected = judged[inverse] & (resid**2 > sigma**2 * scale2)
    return rejected, median_img
