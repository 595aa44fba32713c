"""TAUVEX Level 1a -> 1g chain: runs every calibration step and keeps the requested levels."""

from __future__ import annotations

from collections.abc import Iterable

from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

from services.calibrate.tauvex.appl_cal import appl_cal
from services.calibrate.tauvex.calc_ra import calc_ra
from services.calibrate.tauvex.calc_xy import calc_xy
from services.calibrate.tauvex.flat_fld import flat_fld
from services.calibrate.tauvex.geo_corr import geo_corr
from services.calibrate.tauvex.get_cal import get_cal
from services.calibrate.tauvex.register import register

LEVELS = ("1a", "1b", "1c", "1d", "1e", "1f", "1g")


def run_chain(
    level1a: fits.HDUList, attitude: Table, *, keep_levels: Iterable[str] = ("1a", "1g"),
    reference_ra_deg: NDArray | None = None, reference_dec_deg: NDArray | None = None,
    slice_s: float = 4.0,
) -> dict[str, fits.HDUList]:
    """Run CALC_XY, GET_CAL+APPL_CAL, FLAT_FLD, GEO_CORR, CALC_RA, REGISTER on one telescope.

    Returns {level: product} for the levels in `keep_levels` (subset of "1a".."1g").
    `attitude` is the Level 1 attitude table; the reference catalogue (deg) goes to REGISTER.
    """
    keep = set(keep_levels)
    unknown = keep - set(LEVELS)
    if unknown:
        raise ValueError(f"unknown levels {sorted(unknown)}; choose from {LEVELS}")
    cal = get_cal(int(level1a["EVENTS"].header["TELE_NUM"]))
    out: dict[str, fits.HDUList] = {}
    prod = level1a
    steps = {
        "1b": calc_xy,
        "1c": lambda p: appl_cal(p, cal),
        "1d": lambda p: flat_fld(p, cal),
        "1e": lambda p: geo_corr(p, cal),
        "1f": lambda p: calc_ra(p, attitude),
        "1g": lambda p: register(p, reference_ra_deg=reference_ra_deg,
                                 reference_dec_deg=reference_dec_deg, slice_s=slice_s),
    }
    if "1a" in keep:
        out["1a"] = level1a
    for level, step in steps.items():
        prod = step(prod)
        if level in keep:
            out[level] = prod
    return out
