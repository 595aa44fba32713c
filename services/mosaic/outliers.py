"""Temporal outlier rejection: sigma-clip the stack of frames at each output pixel.

Each input pixel is assigned to the output pixel its footprint centre falls in; at every
output pixel with coverage >= `min_coverage` the median of the stack is the reference. A
sample is an outlier when |value - median| > sigma * sqrt(unc^2 * (1 + pi/2n) + (frac *
deriv)^2), where deriv is the largest difference between the median image and its 8
neighbours (the JWST blot-derivative idea): on a bright, undersampled point source the
samples of one output pixel legitimately differ by about that much (sub-pixel phase), so
sources are not clipped while cosmic rays on flat sky are. Rejected samples go back to the
input frames' rmask.

Where a stack is too shallow to judge (coverage < `min_coverage`, e.g. a mosaic's edges),
`single_frame_spikes` finds the pixels that stand out of their own frame more sharply than
any point source can: a radiation hit or a hot pixel that no mask flagged (a BCD submitted
without its bbmsk) would otherwise be coadded and detected as a source.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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


def single_frame_spikes(
    data: np.ndarray,
    unc: np.ndarray,
    valid: np.ndarray,
    *,
    sigma: float = 5.0,
    sharpness: float = 0.2,
) -> np.ndarray:
    """Pixels of one frame that differ from the median of their 5x5 neighbourhood by more
    than `sigma` x unc while none of their 8 neighbours differs from that median (in the same
    sense) by more than `sharpness` x as much.

    A point source sampled with FWHM >= 1.3 pixels (every MIPS and IRAC array) puts at least
    ~0.3 of its peak excess into its brightest neighbour, so it is never a spike; a one-pixel
    radiation hit or hot (or dead) pixel is. Only pixels whose 8 neighbours are all valid are
    judged (a frame's edge or a masked neighbour hides a source's wings).
    """
    good = valid & np.isfinite(data) & np.isfinite(unc) & (unc > 0)
    spikes = np.zeros(data.shape, dtype=bool)
    if not good.any():
        return spikes
    filled = np.where(good, data, np.median(data[good])).astype(np.float64)
    limit = sigma * np.where(good, unc, np.inf)
    # Candidates by the cheap 5x5 mean (a hit moves it by 1/25 of itself): only they need the
    # 5x5 median. Only pixels whose 8 neighbours are all valid are judged: at a frame's edge or
    # beside masked pixels the neighbourhood cannot show a source's wings.
    cand = good & (np.abs(filled - ndimage.uniform_filter(filled, 5, mode="nearest"))
                   > 0.75 * limit)
    cy, cx = np.nonzero(cand)
    dy = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
    dx = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
    ny_, nx_ = (cy[:, None] + dy, cx[:, None] + dx)  # (n, 8) neighbour coordinates
    whole = np.pad(good, 1)[ny_ + 1, nx_ + 1].all(axis=1)
    cy, cx, ny_, nx_ = cy[whole], cx[whole], ny_[whole], nx_[whole]
    if cy.size == 0:
        return spikes
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(filled, 2, mode="edge"), (5, 5))
    # The local level: the 5x5 median (one hit does not shift it; it is the neighbours' too).
    level = np.partition(windows[cy, cx].reshape(cy.size, 25), 12, axis=1)[:, 12]
    centre = filled[cy, cx] - level
    size = np.abs(centre)
    # the neighbours' largest excess over that level, in the centre's sense
    same_side = np.max(np.sign(centre)[:, None] * (filled[ny_, nx_] - level[:, None]), axis=1)
    hit = (size > limit[cy, cx]) & (same_side < sharpness * size)
    spikes[cy[hit], cx[hit]] = True
    return spikes


def find_outliers(
    samples: Samples,
    *,
    grid_shape: tuple[int, int],
    sigma: float = 4.0,
    frac: float = 0.5,
    min_coverage: int = 3,
    spikes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean per sample (True = outlier) and the median image used as reference.

    `sigma` is the clipping threshold in units of the combined scale; `frac` the fraction of
    the local derivative tolerated (PSF undersampling, gradients inside an output pixel);
    `min_coverage` the least number of samples an output pixel needs to be judged at all.
    `spikes` (per sample, from `single_frame_spikes`) are rejected where the stack is too
    shallow to be judged.
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
    if spikes is not None and spikes.any():
        rejected |= _spikes_to_reject(pix, samples, spikes, judged[inverse], sigma)
    return rejected, median_img


def _spikes_to_reject(
    pix: np.ndarray, samples: Samples, spikes: np.ndarray, judged: np.ndarray, sigma: float
) -> np.ndarray:
    """Spike samples to reject: all of them where the stack is too shallow to judge, and
    where it is judged those deviating by > `sigma` x unc from the median of the stack's
    other (non-spike) samples. Two hits in one shallow stack would otherwise carry the median
    with them, and the derivative allowance (meant for undersampled sources, which are never
    spikes) would keep them."""
    out = spikes & ~judged
    at_spike = np.isin(pix, pix[spikes & judged])
    clean = at_spike & ~spikes
    if not clean.any():
        return out
    cpix, cmed, _counts, _inverse = group_medians(pix[clean], samples.value[clean])
    cand = np.flatnonzero(spikes & judged)
    pos = np.minimum(np.searchsorted(cpix, pix[cand]), cpix.size - 1)
    has_ref = cpix[pos] == pix[cand]
    dev = np.abs(samples.value[cand].astype(np.float64) - cmed[pos])
    far = has_ref & (dev > sigma * samples.unc[cand].astype(np.float64))
    out[cand[far]] = True
    return out
