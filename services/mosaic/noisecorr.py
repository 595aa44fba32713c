"""Noise correlation of a drizzled mosaic: how much a per-pixel `munc` underestimates the noise
of a flux measured over several pixels.

Each input pixel is spread over the output pixels its footprint overlaps (the turbo kernel of
`resample.drizzle`: an axis-aligned square of side pixfrac * sqrt(footprint area)), so
neighbouring output pixels share input noise. `munc` is right pixel by pixel, but a PSF-weighted
(or aperture) flux that sums pixels as if independent comes out too confident by the factor
returned here. The model: along each axis the input noise of one frame is a piecewise-constant
field of boxes of width w = pixfrac * r (r = input pixel side in output pixels); with the dither
phases uniform, the covariance of two output pixels Delta apart is proportional to
(T_1 * T_w)(Delta), T_a(u) = max(a - |u|, 0) the autocorrelation of a box of width a, and the
2-D covariance is the product of the two axes'. For the optimal PSF-weighted flux
F = sum(P d) / sum(P^2) of a Gaussian PSF (pixel-integrated), the variance is
P^T C P / (sum P^2)^2 against the per-pixel prediction C(0) / sum P^2; their ratio, averaged over
the source's sub-pixel phase, is the square of the factor. It is the same at every coverage.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

#: Sub-pixel phases over which the factor is averaged, and samples per output pixel of the
#: numerical convolution (the factor is smooth in both: 32 of each is good to < 0.1%).
_N_PHASE = 32
_N_SUB = 32


def _axis_covariance(width_px: float, lags: np.ndarray) -> np.ndarray:
    """Covariance (up to a constant) of output pixels `lags` apart along one axis, for input
    boxes of width `width_px` output pixels: (T_1 * T_w)(lag), evaluated numerically."""
    h = 1.0 / _N_SUB
    u = np.arange(-math.ceil(width_px + 2) * _N_SUB, math.ceil(width_px + 2) * _N_SUB + 1) * h
    t1 = np.maximum(1.0 - np.abs(u), 0.0)
    tw = np.maximum(width_px - np.abs(u), 0.0)
    conv = np.convolve(t1, tw, mode="same") * h
    return np.interp(lags, u, conv, left=0.0, right=0.0)


def _axis_variance_ratio(width_px: float, psf_sigma_px: float) -> float:
    """Phase-averaged (P^T C P) / (C(0) sum P^2) along one axis."""
    half = math.ceil(4.0 * psf_sigma_px + width_px + 2.0)
    j = np.arange(-half, half + 1, dtype=float)
    cov = _axis_covariance(width_px, np.arange(2 * half + 1, dtype=float))
    lag = np.abs(j[:, None] - j[None, :]).astype(np.int64)
    c = cov[lag] / cov[0]
    s = math.sqrt(2.0) * psf_sigma_px
    ratios = []
    for phase in (np.arange(_N_PHASE) + 0.5) / _N_PHASE - 0.5:
        p = 0.5 * (erf((j - phase + 0.5) / s) - erf((j - phase - 0.5) / s))
        ratios.append(float(p @ c @ p) / float(p @ p))
    return float(np.mean(ratios))


def point_source_noise_factor(
    *, input_pixel_px: float, psf_fwhm_px: float, pixfrac: float = 1.0
) -> float:
    """Actual / munc-predicted noise of an optimal PSF-weighted point-source flux (>= 1).

    `input_pixel_px` is the side of an input pixel in output pixels (sqrt of its footprint
    area), `psf_fwhm_px` the FWHM of the (Gaussian) PSF in output pixels, `pixfrac` the drizzle
    footprint shrink factor. Multiply a point-source uncertainty computed from `munc` as if its
    pixels were independent by this factor.
    """
    if not (input_pixel_px > 0 and psf_fwhm_px > 0 and pixfrac > 0):
        raise ValueError("input_pixel_px, psf_fwhm_px and pixfrac must be positive")
    sigma = psf_fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    # the variance ratio is the product of the two (identical: square footprints) axes', so
    # the noise factor, its square root, is one axis's variance ratio
    return _axis_variance_ratio(pixfrac * input_pixel_px, sigma)


def large_aperture_noise_factor(*, input_pixel_px: float, pixfrac: float = 1.0) -> float:
    """The same factor for a flux summed over an area much larger than the input pixels: the
    square root of the sum of all correlation coefficients, sum(C) / C(0)."""
    if not (input_pixel_px > 0 and pixfrac > 0):
        raise ValueError("input_pixel_px and pixfrac must be positive")
    w = pixfrac * input_pixel_px
    lags = np.arange(-math.ceil(w + 2), math.ceil(w + 2) + 1, dtype=float)
    cov = _axis_covariance(w, lags)
    return float(cov.sum() / _axis_covariance(w, np.zeros(1))[0])
