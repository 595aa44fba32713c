"""ISOCAM CCIM: calibrated rate image per raster position (mean of its usable pairs)."""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from shared.instruments import isocam as ic

VERSION = "CCIM 1.0"


def make_ccim(cisp: fits.HDUList, rate_adug_s: NDArray[np.floating], good: NDArray[np.bool_],
              *, header_extra: dict[str, tuple[object, str]] | None = None) -> fits.HDUList:
    """Average calibrated pair rates (n, 1024; rows as in CISP) over each raster position.

    `good` (n, 1024) selects usable values (CISPDISC = 0, not dead, not saturated, not a
    glitch). ARRAYERR is the standard error of the mean from the scatter (NaN with < 2
    values); NGOOD the values averaged; EXPTIME the summed integration of usable pairs (s).
    """
    pos = ic.column(cisp, "RASTPOS")
    tint = ic.column(cisp, "TINT").astype(np.float64)
    r = np.where(good, np.asarray(rate_adug_s, dtype=np.float64), 0.0)
    positions = np.unique(pos[pos > 0])
    # One row per position: a one-hot (position x row) matrix does the sums in one product.
    onehot = (pos[None, :] == positions[:, None]).astype(np.float64)
    ngood = onehot @ good.astype(np.float64)
    s1 = onehot @ r
    s2 = onehot @ (r * r)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ngood > 0, s1 / ngood, np.nan)
        var = (s2 - ngood * mean * mean) / (ngood - 1.0)
        err = np.where(ngood > 1, np.sqrt(np.maximum(var, 0.0) / ngood), np.nan)
    first = np.argmax(onehot > 0, axis=1)
    rows_ok = (ic.column(cisp, "CISPDISC") == 0).astype(np.float64)
    h = ic.carry(cisp[0].header, root="CCIM")
    h["NRASTPOS"] = (int(positions.size), "raster positions (rows)")
    h["CCIMVERS"] = (VERSION, "version of the CCIM step")
    for k, (v, c) in (header_extra or {}).items():
        h[k] = (v, c)
    cols = [
        fits.Column("RASTPOS", "J", array=positions.astype(np.int32)),
        fits.Column("GSCPTKEY", "J", unit="ITK", array=ic.column(cisp, "GSCPTKEY")[first]),
        fits.Column("RA", "D", unit="deg", array=ic.column(cisp, "RA")[first]),
        fits.Column("DEC", "D", unit="deg", array=ic.column(cisp, "DEC")[first]),
        fits.Column("ROLL", "E", unit="deg", array=ic.column(cisp, "ROLL")[first]),
        fits.Column("LENS", "E", unit="arcsec", array=ic.column(cisp, "LENS")[first]),
        fits.Column("NPAIRS", "I", array=(onehot @ rows_ok).astype(np.int16)),
        fits.Column("EXPTIME", "E", unit="s", array=onehot @ (rows_ok * tint)),
        fits.Column("ARRAY", f"{ic.NPIX}E", unit="adu/s", array=mean.astype(np.float32)),
        fits.Column("ARRAYERR", f"{ic.NPIX}E", unit="adu/s", array=err.astype(np.float32)),
        fits.Column("NGOOD", f"{ic.NPIX}I", array=ngood.astype(np.int16)),
        fits.Column("EXPMAP", f"{ic.NPIX}E", unit="s",
                    array=(onehot @ (good * tint[:, None])).astype(np.float32)),
    ]
    return ic.table_product(h, cols, root="CCIM", table_header={
        "ARRUNIT": ("ADU/G/s", "ARRAY unit: ADU per unit gain per second")})
