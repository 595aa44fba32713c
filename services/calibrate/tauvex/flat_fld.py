"""TAUVEX FLAT_FLD module (Level 1d): divide each event's CALIB by the detector flat field."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from services.calibrate.tauvex import get_cal as get_cal_mod
from services.calibrate.tauvex.get_cal import CalibrationReference
from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["FLAT_FLD"]


def flat_fld(level1c: fits.HDUList, cal: CalibrationReference | None = None) -> fits.HDUList:
    """Level 1c -> 1d: CALIB /= flat(X, Y) for valid events (flat = relative response <= 1)."""
    cols, header = tv.event_columns(level1c)
    cal = cal or get_cal_mod.get_cal(int(header["TELE_NUM"]))
    valid = cols["VALIDITY"] == 0
    flat = np.ones(cols["X"].size)
    flat[valid] = cal.flat(cols["X"][valid].astype(np.float64), cols["Y"][valid].astype(np.float64))
    cols["CALIB"] = np.where(valid & (flat > 0), cols["CALIB"] / np.where(flat > 0, flat, 1.0),
                             0.0).astype(np.float32)
    h = tv.product_header(header)
    h["FLAT_FLD"] = (VERSION, "version of module FLAT_FLD")
    return tv.event_table("1d", cols, h)
