"""ISOCAM Derive_SPD chain: CIER -> CISP, then dark, deglitch, transient, flat -> CCIM + CGLL."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from services.calibrate.isocam import deglitch as dg
from services.calibrate.isocam import transient as tr
from services.calibrate.isocam.ccim import make_ccim
from services.calibrate.isocam.dark import subtract_dark
from services.calibrate.isocam.flat import apply_flat
from services.calibrate.isocam.spd import derive_spd
from shared.instruments import isocam as ic


@dataclass(slots=True)
class SpdProducts:
    """Products of one observation's Derive_SPD + image construction."""

    cisp: fits.HDUList  #: raw pair rates (ADU/G/s), status columns
    cgll: fits.HDUList  #: glitch list
    ccim: fits.HDUList  #: calibrated rate image per raster position (ADU/G/s, flat-fielded)
    rate_adug_s: NDArray[np.float64]  #: (n, 1024) calibrated pair rates, rows as CISP
    good: NDArray[np.bool_]  #: (n, 1024) usable values of `rate_adug_s`
    glitch: NDArray[np.bool_]  #: (n, 1024) deglitching mask


def calibrate_observation(
    cier: fits.HDUList, *, transient: ic.TransientModel = ic.TRANSIENT,
    dark_adug_s: NDArray[np.floating] | None = None, flat: NDArray[np.floating] | None = None,
    glitch_threshold: float = 4.5, glitch_window: int = 5, read_noise_adu: float = 1.5,
    electrons_per_adug: float = 10.0,
) -> SpdProducts:
    """CIER -> CISP (pairs), then on complete pairs: dark subtraction, deglitching (glitched
    values replaced by the running median), transient correction, flat field; CCIM averages
    the usable values per raster position. Parameters default to `shared.instruments.isocam`.
    """
    cisp = derive_spd(cier)
    disc = ic.column(cisp, "CISPDISC")
    pixstat = ic.column(cisp, "PIXSTAT")
    raw = ic.column(cisp, "ARRAY").astype(np.float64)
    complete = (disc & 1) == 0  # transient model needs every measured pair, moving ones too
    ci = np.nonzero(complete)[0]
    rate = np.full(raw.shape, np.nan)
    glitch = np.zeros(raw.shape, dtype=bool)
    h0 = cisp[0].header
    gain, tint_s = float(h0.get("GAIN", 1)), float(h0.get("TINT", 1.0))
    if ci.size:
        r = subtract_dark(raw[ci], dark_adug_s=dark_adug_s)
        r[:, np.arange(ic.NPIX) % ic.NPIX_SIDE == ic.DEAD_COLUMN] = np.nan
        pos = np.where(disc[ci] == 0, ic.column(cisp, "RASTPOS")[ci], 0)
        deg = dg.find_glitches(r, pos, gain=gain, tint_s=tint_s, window=glitch_window,
                               threshold=glitch_threshold, read_noise_adu=read_noise_adu,
                               electrons_per_adug=electrons_per_adug)
        itk = ic.column(cisp, "GSCPTKEY")[ci].astype(np.float64)
        t_s = (itk - itk[0]) * float(h0["TREFITKU"])
        s = tr.correct_transient(deg.rate_adug_s, t_s, ic.column(cisp, "TINT")[ci],
                                 model=transient)
        rate[ci] = apply_flat(s, flat=flat)
        glitch[ci] = deg.mask
        full = dg.Deglitched(glitch, np.zeros_like(raw), np.zeros_like(raw), np.ones_like(raw))
        full.residual_adug_s[ci], full.sigma_adug_s[ci] = deg.residual_adug_s, deg.sigma_adug_s
    else:
        full = dg.Deglitched(glitch, raw, np.zeros_like(raw), np.ones_like(raw))
    good = ((disc == 0)[:, None] & (pixstat == 0) & ~glitch & np.isfinite(rate))
    cgll = dg.glitch_list(h0, full, ic.column(cisp, "GSCPTKEY"))
    extra: dict[str, tuple[object, str]] = {
        "DARKSUB": ("COMPLETE", "dark model subtracted"),
        "DEGLITCH": ("COMPLETE", f"running median {glitch_window}, {glitch_threshold} sigma"),
        "TRANSCOR": ("COMPLETE", "lagging-fraction model inverted"),
        "TRANFRAC": (transient.fraction, "transient: lagging fraction"),
        "TRANTAU": (transient.tau_s, "[s] transient: time constant"),
        "FLATCOR": ("COMPLETE", "divided by the detector x optical flat"),
        "NGLPIX": (int(glitch.sum()), "glitched pixel values masked"),
        "FLUXCONV": (ic.flux_conversion(str(h0["FILTER"]), float(h0["LENS"])),
                     "[ADU/G/s/Jy] point-source conversion (assumed)"),
    }
    ccim = make_ccim(cisp, np.nan_to_num(rate), good, header_extra=extra)
    return SpdProducts(cisp, cgll, ccim, rate, good, glitch)
