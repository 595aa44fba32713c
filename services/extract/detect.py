"""Point-source detection: PSF-matched filter S/N map, peaks, segmentation and blend flags."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from services.extract.prf import sigma_from_fwhm


@dataclass(frozen=True, slots=True)
class MatchedFilter:
    """Per-pixel PSF-weighted (optimal) amplitude fit of a point source centred on the pixel.

    `flux` is the point-source flux estimate (image unit x pixel) and `snr` its signal-to-noise,
    already divided by `noise_scale`, the robust RMS of the raw S/N map over source-free pixels
    (1.0 when the uncertainty map describes the noise exactly).
    """

    num: np.ndarray  #: sum(P d w) at every pixel (the filtered weighted image)
    snr: np.ndarray
    noise_scale: float
    den: np.ndarray  #: sum(P^2 w) at every pixel (reused to filter a residual image)
    sigma_px: float  #: Gaussian sigma of the filter
    inv_sqrt_den: np.ndarray  #: 1 / sqrt(den), 0 where den = 0 (reused too)

    @property
    def flux(self) -> np.ndarray:
        """Flux estimate sum(P d w) / sum(P^2 w) at every pixel (image unit x pixel)."""
        return self.num * self.inv_sqrt_den * self.inv_sqrt_den

    def flux_at(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """`flux` at the pixels (iy, ix) only (the detections need no full map)."""
        inv = self.inv_sqrt_den[iy, ix]
        return self.num[iy, ix] * inv * inv


def refilter(mf: MatchedFilter, image: np.ndarray, weight: np.ndarray) -> MatchedFilter:
    """The matched filter of another image with the same weights (e.g. a fit residual): one
    Gaussian filter, the denominator and the noise calibration are reused."""
    dw = np.asarray(image, dtype=float) * weight
    num = ndimage.gaussian_filter(dw, mf.sigma_px, mode="constant", truncate=4.0)
    # The product's buffer, no longer needed, holds the S/N map (no fresh image-sized array).
    snr = np.multiply(num, mf.inv_sqrt_den, out=dw)
    snr /= mf.noise_scale
    return MatchedFilter(num=num, snr=snr, noise_scale=mf.noise_scale, den=mf.den,
                         sigma_px=mf.sigma_px, inv_sqrt_den=mf.inv_sqrt_den)


def _inv_sqrt(den: np.ndarray) -> np.ndarray:
    """1 / sqrt(den), 0 where den <= 0."""
    positive = den > 0
    out = np.zeros_like(den)
    np.sqrt(den, out=out, where=positive)
    np.divide(1.0, out, out=out, where=positive)
    return out


def grow_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """`mask` grown by a `size` x `size` square (odd size): ndimage.maximum_filter(mask, size)
    as shifted ORs, which cost a fraction of the filter on a small boolean map."""
    half = size // 2
    rows = mask.copy()
    for k in range(1, half + 1):
        rows[k:] |= mask[:-k]
        rows[:-k] |= mask[k:]
    out = rows.copy()
    for k in range(1, half + 1):
        out[:, k:] |= rows[:, :-k]
        out[:, :-k] |= rows[:, k:]
    return out


def matched_filter(
    image: np.ndarray,
    weight: np.ndarray,
    *,
    fwhm_px: float,
    calibrate: bool = True,
    calibration_step: int | None = None,
) -> MatchedFilter:
    """PSF-matched filter of a background-subtracted image with per-pixel weights 1/sigma^2.

    With P the unit-flux PSF, flux = sum(P d w) / sum(P^2 w) and snr = sum(P d w) /
    sqrt(sum(P^2 w)): the S/N of a one-parameter PSF fit at every pixel, which handles varying
    noise and masked pixels (w = 0) exactly. For a Gaussian PSF both sums are Gaussian filters.
    When `calibrate`, the S/N map is rescaled so that its robust RMS over pixels away from
    >5 sigma sources is 1: this calibrates the uncertainty map against the actual background noise
    (e.g. correlated noise in a resampled mosaic). `calibration_step`: the statistics use every
    n-th pixel per axis (default 3 above 250,000 pixels, 2 above 60,000, else 1).
    """
    # Pixel integration broadens the PSF by a 1-pixel box (variance 1/12 px^2).
    sigma = math.sqrt(sigma_from_fwhm(fwhm_px) ** 2 + 1.0 / 12.0)
    dw = np.asarray(image, dtype=float) * weight
    num = ndimage.gaussian_filter(dw, sigma, mode="constant", truncate=4.0)
    den = ndimage.gaussian_filter(np.asarray(weight, dtype=float), sigma / math.sqrt(2.0),
                                  mode="constant", truncate=4.0)
    den /= 4.0 * math.pi * sigma * sigma
    inv_sqrt = _inv_sqrt(den)
    # The product's buffer, no longer needed, holds the S/N map (no fresh image-sized array).
    snr = np.multiply(num, inv_sqrt, out=dw)
    scale = 1.0
    if calibrate:
        # Statistics on every 3rd pixel per axis: plenty of pixels, a ninth of the cost.
        step = calibration_step or (3 if snr.size > 250_000 else 2 if snr.size > 60_000 else 1)
        snr_s = snr[::step, ::step]
        valid = (weight[::step, ::step] > 0) & (den[::step, ::step] > 0)
        # Exclude the footprints of real sources (>5 sigma, grown by 2 FWHM); the few faint
        # sources left barely move the central 68% interval of ~all pixels. "5 sigma" is in
        # calibrated units, so the estimate is iterated: where the unc map underestimates the
        # noise several-fold (a mosaic resampled from much larger pixels, e.g. 70 um), a
        # raw-unit cut would mask nearly every pixel and leave only the crowded-map fallback.
        grow = 2 * math.ceil(2 * fwhm_px / step) + 1
        # Start from the RMS of the map's negative half: sources only add, so it is the noise
        # sigma of a crowded (confused) map with no source-free area, and close otherwise.
        neg = snr_s[valid & (snr_s < 0)]
        neg_rms = float(np.sqrt(np.mean(neg * neg))) if neg.size > 100 else 0.0
        valid_n = int(valid.sum())
        est = neg_rms or 1.0
        for _ in range(4):
            new = _quiet_rms(snr_s, valid, valid_n, grow=grow, threshold=5.0 * est) or neg_rms
            if new <= 0:
                break
            done = abs(new - est) < 0.02 * est
            est = new
            if done:
                break
        # Only a bounded rescaling is believable: a large factor means a wrong unc map.
        scale = float(np.clip(est, 0.2, 10.0))
    if scale != 1.0:
        snr /= scale
    return MatchedFilter(num=num, snr=snr, noise_scale=scale, den=den, sigma_px=sigma,
                         inv_sqrt_den=inv_sqrt)


def _derivative(a: np.ndarray) -> np.ndarray:
    """d/dx along the last axis by the 5-point stencil (f(x-2) - 8 f(x-1) + 8 f(x+1) -
    f(x+2)) / 12, on the points 2 from either end: close to the exact derivative up to
    ~1/3 of the Nyquist frequency (a central difference already loses 5% there)."""
    return np.asarray((a[..., :-4] - a[..., 4:] + 8.0 * (a[..., 3:-1] - a[..., 1:-3])) / 12.0)


def position_noise_scale(
    mf: MatchedFilter,
    weight: np.ndarray,
    *,
    valid: np.ndarray,
    fwhm_px: float,
    max_side: int = 128,
) -> float:
    """How much the actual noise moves a point-source position fit against what the weights
    predict: 1.0 for white noise that `weight` describes.

    `mf.noise_scale` calibrates fluxes, whose noise is the image filtered by the PSF. A
    position's noise is the image filtered by the PSF's derivative, which weights small scales
    more, where a resampled mosaic's correlated noise has less power: its scale is smaller
    (0.6-0.8 of the flux's on the MIPS 24 um mosaics here). Measured like the flux scale: the
    robust RMS of the x- and y-derivatives (5-point stencil) of the matched filter's
    filtered image `mf.num` (pooled: the resampling's correlations are close to isotropic),
    normalised for white noise, on pixels away from > 5 sigma sources, on a central crop of
    at most `max_side` px per side (the resampling is the same everywhere; ~0.3 ms). 1.0 when
    too few quiet pixels.
    """
    sigma = mf.sigma_px
    ny, nx = weight.shape
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0 or ny < 5 or nx < 5:
        return 1.0
    side_y, side_x = min(ny, max_side + 4), min(nx, max_side + 4)
    y0 = int(np.clip((rows[0] + rows[-1]) // 2 - side_y // 2, 0, ny - side_y))
    x0 = int(np.clip((cols[0] + cols[-1]) // 2 - side_x // 2, 0, nx - side_x))
    num = mf.num[y0:y0 + side_y, x0:x0 + side_x]
    inner = (slice(y0 + 2, y0 + side_y - 2), slice(x0 + 2, x0 + side_x - 2))
    # White-noise normalisation of the kernel (the Gaussian's along one axis, its derivative
    # along the other): the product of the two 1-D factors' sums of squares.
    half = math.ceil(4.0 * sigma) + 2
    delta = np.zeros(2 * half + 1)
    delta[half] = 1.0
    g = ndimage.gaussian_filter1d(delta, sigma, mode="constant", truncate=4.0)
    k2 = float(np.sum(g * g) * np.sum(np.square(_derivative(g))))
    # mf.den * 4 pi sigma^2 is the weight smoothed over the PSF (the local 1/sigma^2).
    local_w = mf.den[inner] * (4.0 * math.pi * sigma * sigma)
    quiet = valid[inner] & (local_w > 0)
    quiet &= ~grow_mask(np.abs(mf.snr[inner]) > 5.0, 2 * math.ceil(2 * fwhm_px) + 1)
    # Statistics on every 2nd pixel per axis: the filtered maps are smooth on the PSF's
    # scale, so neighbours add little, and the percentiles cost a quarter.
    quiet = quiet[::2, ::2]
    if int(quiet.sum()) < 250:
        return 1.0
    norm = 1.0 / np.sqrt(local_w[::2, ::2][quiet] * k2)
    dx = _derivative(num[2:-2])
    dy = _derivative(num[:, 2:-2].T).T
    z = np.concatenate([dx[::2, ::2][quiet] * norm, dy[::2, ::2][quiet] * norm])
    return float(np.clip(_robust_sigma(z), 0.2, 10.0))


def _robust_sigma(values: np.ndarray) -> float:
    """Half the central 68.27% interval: the sigma of the Gaussian core, blind to tails."""
    lo, hi = np.percentile(values, [15.865, 84.135])
    return float(0.5 * (hi - lo))


def _quiet_rms(snr: np.ndarray, valid: np.ndarray, n_valid: int, *, grow: int,
               threshold: float) -> float:
    """Robust RMS of an S/N map away from sources brighter than `threshold` (grown by `grow`
    pixels); 0 when fewer than max(100, 5% of the `n_valid` valid pixels) are left."""
    near = grow_mask(np.abs(snr) > threshold, grow)
    quiet = snr[valid & ~near]
    return _robust_sigma(quiet) if quiet.size > max(100, n_valid // 20) else 0.0


@dataclass(frozen=True, slots=True)
class Detections:
    """Peaks of the S/N map: 0-based pixel positions refined to sub-pixel, first-guess flux."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    snr: np.ndarray
    segment: np.ndarray  #: label of the connected above-threshold region holding the peak
    n_in_segment: np.ndarray  #: peaks sharing that region (>1: deblended)
    segmentation: np.ndarray  #: label image (0 = background)

    def subset(self, keep: np.ndarray) -> Detections:
        """The detections selected by `keep` (boolean or indices), in their order."""
        return Detections(x=self.x[keep], y=self.y[keep], flux=self.flux[keep],
                          snr=self.snr[keep], segment=self.segment[keep],
                          n_in_segment=self.n_in_segment[keep],
                          segmentation=self.segmentation)


def find_peaks(
    mf: MatchedFilter,
    *,
    threshold: float,
    valid: np.ndarray,
    segment_threshold: float | None = None,
    exclude_border_px: int = 1,
    segments: bool = True,
) -> Detections:
    """Local maxima of the S/N map above `threshold` on valid pixels.

    Every local maximum (3x3 neighbourhood) becomes a point source, so overlapping sources with
    separate peaks are deblended; the segmentation labels connected regions of S/N above
    `segment_threshold` (default: `threshold`) and counts the peaks in each. Positions are
    refined by a quadratic fit to the 3x3 S/N values around the peak. Without `segments` (a
    caller that does not use them), the labelling is skipped: every peak is its own segment
    and `segmentation` is empty.
    """
    snr = mf.snr
    ny, nx = snr.shape
    seg_thr = threshold if segment_threshold is None else segment_threshold
    # Candidates are the few pixels above threshold: compare each with its 8 neighbours
    # instead of max-filtering the whole image.
    at_threshold = snr >= threshold
    above = at_threshold & valid
    b = max(1, exclude_border_px)
    above[:b, :] = False
    above[-b:, :] = False
    above[:, :b] = False
    above[:, -b:] = False
    # flatnonzero + divmod: the same indices in the same order as np.nonzero on the 2-D mask,
    # at a twentieth of its cost (numpy's 2-D nonzero is slow for sparse masks).
    iy, ix = np.divmod(np.flatnonzero(above), nx)
    v = snr[iy, ix]
    is_peak = np.ones(iy.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_peak &= v >= snr[iy + dy, ix + dx]
    iy, ix = iy[is_peak], ix[is_peak]
    if segments:
        segmentation, _ = ndimage.label(at_threshold if seg_thr == threshold else snr >= seg_thr)
        seg = segmentation[iy, ix]
        counts = np.bincount(seg, minlength=segmentation.max() + 1)
    else:
        segmentation = np.zeros((0, 0), dtype=np.int32)
        seg = np.arange(1, iy.size + 1)
        counts = np.ones(iy.size + 1, dtype=np.int64)
    y0 = np.clip(iy, 1, ny - 2)
    x0 = np.clip(ix, 1, nx - 2)
    c = snr[y0, x0]
    dxn = (snr[y0, x0 + 1] - snr[y0, x0 - 1]) * 0.5
    dyn = (snr[y0 + 1, x0] - snr[y0 - 1, x0]) * 0.5
    dxx = snr[y0, x0 + 1] - 2 * c + snr[y0, x0 - 1]
    dyy = snr[y0 + 1, x0] - 2 * c + snr[y0 - 1, x0]
    with np.errstate(divide="ignore", invalid="ignore"):
        sx = np.where(dxx < 0, -dxn / dxx, 0.0)
        sy = np.where(dyy < 0, -dyn / dyy, 0.0)
    sx = np.clip(np.nan_to_num(sx), -0.5, 0.5)
    sy = np.clip(np.nan_to_num(sy), -0.5, 0.5)
    order = np.argsort(-snr[iy, ix], kind="stable")
    return Detections(
        x=(ix + sx)[order].astype(float),
        y=(iy + sy)[order].astype(float),
        flux=mf.flux_at(iy, ix)[order],
        snr=snr[iy, ix][order],
        segment=seg[order],
        n_in_segment=counts[seg][order],
        segmentation=segmentation,
    )
