"""ISOCAM deglitching: temporal running-median clipping per pixel over a pointing's pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray
from scipy import ndimage

from shared.instruments import isocam as ic

VERSION = "DEGLITCH 1.0"


@dataclass(frozen=True, slots=True)
class Deglitched:
    """Glitch mask and the rates with glitched values replaced by the running median."""

    mask: NDArray[np.bool_]  #: (n, 1024) True = glitch
    rate_adug_s: NDArray[np.float64]  #: (n, 1024) glitches replaced (for the transient model)
    residual_adug_s: NDArray[np.float64]  #: (n, 1024) rate - running median
    sigma_adug_s: NDArray[np.float64]  #: (n, 1024) noise used for the threshold


def noise_model(level_adug_s: NDArray[np.floating], *, gain: float, tint_s: float,
                read_noise_adu: float = 1.5, electrons_per_adug: float = 10.0
                ) -> NDArray[np.float64]:
    """Noise (ADU/G/s) of one pair rate: read noise of two readouts + photon shot noise.

    Detector constants are ASSUMED ground-calibration values (simulator defaults)."""
    lvl = np.maximum(np.asarray(level_adug_s, dtype=np.float64), 0.0)
    read = np.sqrt(2.0) * read_noise_adu / (gain * tint_s)
    return np.sqrt(read * read + lvl / (electrons_per_adug * tint_s))


def find_glitches(rate_adug_s: NDArray[np.floating], position: NDArray[np.integer], *,
                  gain: float, tint_s: float, window: int = 5, threshold: float = 4.5,
                  grow_threshold: float = 2.0, read_noise_adu: float = 1.5,
                  electrons_per_adug: float = 10.0) -> Deglitched:
    """Flag glitches in (n, 1024) pair rates (dark subtracted) of usable pairs.

    Within each raster position (`position`, same for consecutive rows; <= 0 rows are ignored)
    a running median of `window` pairs along time (mirrored at the ends, so an end value never
    votes for itself twice) is the reference; a running median follows
    the smooth, monotonic transient exactly, so only spikes remain in the residual. A value is
    a glitch when its residual exceeds `threshold` x the noise model; its 8 neighbours in the
    same pair are added when above `grow_threshold` x noise (glitches hit ~8 pixels).
    """
    r = np.asarray(rate_adug_s, dtype=np.float64)
    pos = np.asarray(position)
    med = r.copy()
    for p in np.unique(pos[pos > 0]):  # a handful of raster positions
        sel = np.nonzero(pos == p)[0]
        med[sel] = ndimage.median_filter(r[sel], size=(min(window, sel.size), 1), mode="mirror")
    res = r - med
    sigma = 1.1 * noise_model(med, gain=gain, tint_s=tint_s, read_noise_adu=read_noise_adu,
                              electrons_per_adug=electrons_per_adug)
    use = (pos > 0)[:, None] & np.isfinite(r)
    core = use & (res > threshold * sigma)
    cube = core.reshape(-1, ic.NPIX_SIDE, ic.NPIX_SIDE)
    near = ndimage.binary_dilation(cube, structure=np.array([np.zeros((3, 3)), np.ones((3, 3)),
                                                             np.zeros((3, 3))], dtype=bool))
    mask = core | (near.reshape(r.shape) & use & (res > grow_threshold * sigma))
    return Deglitched(mask, np.where(mask, med, r), res, sigma)


def glitch_list(header: fits.Header, deg: Deglitched, gscptkey: NDArray[np.integer]
                ) -> fits.HDUList:
    """CGLL product: one row per glitched pixel of a pair (CISPROW 1-based -> CISP)."""
    cube = deg.mask.reshape(-1, ic.NPIX_SIDE, ic.NPIX_SIDE)
    lab, n_gl = ndimage.label(cube, structure=np.array(
        [np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))], dtype=bool))
    row, pix = np.nonzero(deg.mask)
    h = ic.carry(header, root="CGLL")
    h["NGLITCH"] = (int(n_gl), "glitches (connected pixel groups in a pair)")
    h["NGLPIX"] = (int(row.size), "glitched pixel values")
    h["DEGLITCH"] = (VERSION, "version of the deglitching step")
    cols = [
        fits.Column("CISPROW", "J", array=row + 1),
        fits.Column("GSCPTKEY", "J", unit="ITK", array=np.asarray(gscptkey)[row]),
        fits.Column("PIXEL", "I", array=pix.astype(np.int16)),
        fits.Column("X", "I", array=(pix % ic.NPIX_SIDE).astype(np.int16)),
        fits.Column("Y", "I", array=(pix // ic.NPIX_SIDE).astype(np.int16)),
        fits.Column("GLITCHID", "J", array=lab.reshape(deg.mask.shape)[row, pix]),
        fits.Column("AMPLITUD", "E", unit="adu/s", array=deg.residual_adug_s[row, pix]),
        fits.Column("SIGNIF", "E", array=(deg.residual_adug_s / deg.sigma_adug_s)[row, pix]),
    ]
    return ic.table_product(h, cols, root="CGLL")
