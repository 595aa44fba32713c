"""Ramps to count rates: 24 um on-board slope/difference planes, Ge ramp fits with jumps.

Both return the rate in DN/s, its variance in (DN/s)^2 from read noise and Poisson noise, and
the status bits the ramp step sets (`MaskBit`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shared.instruments import mips
from shared.instruments.mips import MaskBit


@dataclass(frozen=True, slots=True)
class RampRates:
    """Count rate of every pixel of one DCE (DN/s), its variance ((DN/s)^2) and status bits."""

    rate_dn_s: np.ndarray
    var_dn2_s2: np.ndarray
    mask: np.ndarray  #: int32 MaskBit bits set by the ramp step
    n_saturated: int = 0
    n_jumps: int = 0


def ls_slope_variance(
    n_samples: np.ndarray | float,
    dt_s: float,
    rate_dn_s: np.ndarray,
    read_noise_dn: float,
    gain_e_per_dn: float,
) -> np.ndarray:
    """Variance ((DN/s)^2) of an unweighted least-squares slope over `n_samples` equally spaced
    samples `dt_s` apart: read noise per sample (DN) plus Poisson noise of the accumulated
    charge (Robberto 2009 / Rauscher et al. 2007 for N reads, one group each)."""
    n = np.maximum(np.asarray(n_samples, dtype=np.float64), 2.0)
    rate = np.maximum(rate_dn_s, 0.0)
    read = 12.0 * read_noise_dn**2 / (n * (n * n - 1.0) * dt_s**2)
    poisson = 6.0 * (n * n + 1.0) / (5.0 * n * (n * n - 1.0)) * rate / (gain_e_per_dn * dt_s)
    return np.asarray(read + poisson)


def si_rates(
    cube: np.ndarray,
    *,
    slope_scale: float,
    n_samples: int,
    sat_level_dn: float,
    read_noise_dn: float,
    gain_e_per_dn: float,
    saturation_fraction: float,
) -> RampRates:
    """24 um: count rate from the on-board slope plane, or the first difference when saturated.

    `cube` is the raw (2, ny, nx) int32 product: plane 0 the least-squares slope in DN per
    sample times `slope_scale` (header SLPSCALE), plane 1 sample1 - sample0 in DN. Samples are
    `mips.SI_SAMPLE_S` apart and sample k holds about rate * (k + 1) * dt of charge.

    A ramp that clips at full well (`sat_level_dn`) has a biased slope. It is detected when the
    last sample predicted by the slope, or by the first difference (allowing 5 sigma of its
    noise, and only with a direct neighbour holding >= 30% of the pixel's excess over the
    local background, so that a cosmic ray in the first difference is not taken for
    saturation), reaches
    `saturation_fraction * sat_level_dn`; the rate then comes from the first
    difference (flag SATURATED_FROM_DIFF | SOFT_SATURATED). When the difference itself may be
    clipped (sample 1 near full well) the value is only a lower limit: UNC_STATUS is set too.
    """
    dt = mips.SI_SAMPLE_S
    slope_rate = cube[0].astype(np.float64) / slope_scale / dt
    diff_dn = cube[1].astype(np.float64)
    diff_rate = diff_dn / dt
    n = float(n_samples)
    # Quantisation of the on-board planes adds (1 LSB)^2 / 12.
    var_slope = (
        ls_slope_variance(n, dt, slope_rate, read_noise_dn, gain_e_per_dn)
        + (1.0 / slope_scale) ** 2 / 12.0 / dt**2
    )
    var_diff_dn = 2.0 * read_noise_dn**2 + np.maximum(diff_dn, 0.0) / gain_e_per_dn + 1.0 / 12.0
    limit = saturation_fraction * sat_level_dn
    predicted_by_slope = slope_rate * n * dt
    predicted_by_diff = (diff_dn - 5.0 * np.sqrt(var_diff_dn)) * n
    by_slope = predicted_by_slope >= limit
    # A cosmic ray between samples 0 and 1 also makes the difference large. Real saturation
    # sits in a source core: a PSF puts >= 0.6 of the core's excess over the local background
    # into its brightest direct neighbour, a cosmic ray nearly nothing. A difference-only claim
    # therefore needs a neighbour with >= 30% of the pixel's excess.
    level = np.maximum(predicted_by_slope, predicted_by_diff)
    excess = level - ndimage.median_filter(level, size=7, mode="reflect")
    padded = np.pad(excess, 1, mode="constant", constant_values=0.0)
    neighbour = np.maximum.reduce(
        [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    )
    by_diff = (predicted_by_diff >= limit) & (neighbour >= 0.3 * excess)
    saturated = by_slope | by_diff
    hard = saturated & (2.0 * diff_dn >= limit)

    rate = np.where(saturated, diff_rate, slope_rate)
    var = np.where(saturated, var_diff_dn / dt**2, var_slope)
    mask = np.zeros(cube.shape[1:], dtype=np.int32)
    mask[saturated] |= int(MaskBit.SATURATED_FROM_DIFF | MaskBit.SOFT_SATURATED)
    mask[hard] |= int(MaskBit.UNC_STATUS)
    return RampRates(rate, var, mask, n_saturated=int(saturated.sum()))


def ge_rates(
    cube: np.ndarray,
    *,
    n_ramps: int,
    sat_level_dn: float,
    read_noise_dn: float,
    gain_e_per_dn: float,
    jump_nsigma: float,
    sample_dt_s: float = 1.0 / mips.GE_SAMPLE_RATE_HZ,
) -> RampRates:
    """Ge (70/160 um): fit every pixel's ramp(s) with cosmic-ray jump rejection.

    `cube` is (n_samples, ny, nx) of ramp samples in DN; with `n_ramps` > 1 (160 um 10 s DCEs
    as two 5 s ramps) the samples are split into equal consecutive ramps, each fitted alone and
    the slopes averaged with inverse-variance weights.

    Per ramp, vectorised over pixels: first differences; those whose samples reached full well
    are dropped (flag SOFT_SATURATED); a difference above the pixel's median difference by
    more than `jump_nsigma` robust sigma (MAD, floored by the read-noise model) is a jump
    (flag RAMP_JUMP) and is replaced by the median difference; the cleaned ramp is then fitted
    by unweighted least squares over its unsaturated samples. Pixels left with < 2 samples
    get NaN and UNC_STATUS.
    """
    n_total, ny, nx = cube.shape
    if n_ramps < 1 or n_total % n_ramps:
        raise ValueError(f"{n_total} samples cannot be split into {n_ramps} equal ramps")
    n = n_total // n_ramps
    ramps = cube.astype(np.float64).reshape(n_ramps, n, ny * nx)
    good_sample = ramps < 0.999 * sat_level_dn
    # a sample counts only while the ramp has not yet reached full well
    good_sample = np.cumprod(good_sample, axis=1).astype(bool)
    d = np.diff(ramps, axis=1)
    good_d = good_sample[:, 1:, :]
    d_nan = np.where(good_d, d, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels are handled below
        med = np.nanmedian(d_nan, axis=1)
        mad = np.nanmedian(np.abs(d_nan - med[:, None, :]), axis=1)
    med = np.nan_to_num(med)
    sigma_model = np.sqrt(2.0 * read_noise_dn**2 + np.maximum(med, 0.0) / gain_e_per_dn)
    sigma = np.maximum(1.4826 * np.nan_to_num(mad), 0.5 * sigma_model)
    jump = good_d & (d - med[:, None, :] > jump_nsigma * sigma[:, None, :])
    d_clean = np.where(jump, med[:, None, :], d)
    y = np.concatenate([ramps[:, :1, :], ramps[:, :1, :] + np.cumsum(d_clean, axis=1)], axis=1)
    w = good_sample.astype(np.float64)
    t = (np.arange(n, dtype=np.float64) * sample_dt_s)[None, :, None]
    s0 = w.sum(axis=1)
    s1 = (w * t).sum(axis=1)
    s2 = (w * t * t).sum(axis=1)
    sy = (w * y).sum(axis=1)
    sty = (w * t * y).sum(axis=1)
    det = s0 * s2 - s1 * s1
    ok = s0 >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(ok, (s0 * sty - s1 * sy) / np.where(ok, det, 1.0), np.nan)
    var = ls_slope_variance(s0, sample_dt_s, np.nan_to_num(slope), read_noise_dn, gain_e_per_dn)
    var = np.where(ok, var, np.inf)
    weight = 1.0 / var
    wsum = weight.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(wsum > 0, np.nansum(weight * np.nan_to_num(slope), axis=0) / wsum, np.nan)
        var_rate = np.where(wsum > 0, 1.0 / wsum, np.nan)
    any_jump = jump.any(axis=(0, 1))
    any_sat = (~good_sample).any(axis=(0, 1))
    mask = np.zeros(ny * nx, dtype=np.int32)
    mask[any_jump] |= int(MaskBit.RAMP_JUMP)
    mask[any_sat] |= int(MaskBit.SOFT_SATURATED)
    mask[~np.isfinite(rate)] |= int(MaskBit.UNC_STATUS)
    return RampRates(
        rate.reshape(ny, nx),
        var_rate.reshape(ny, nx),
        mask.reshape(ny, nx),
        n_saturated=int(any_sat.sum()),
        n_jumps=int(jump.sum()),
    )
