"""TAUVEX APPL_CAL module (Level 1c): per-event calibration weight CALIB."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from services.calibrate.tauvex import get_cal as get_cal_mod
from services.calibrate.tauvex.get_cal import CalibrationReference
from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["APPL_CAL"]


def appl_cal(level1b: fits.HDUList, cal: CalibrationReference | None = None) -> fits.HDUList:
    """Level 1b -> 1c: CALIB = photon weight (dimensionless) = 1 / throughput / (1 - rate*tau).

    The rate is the telescope's event rate (events/s) in 1 s bins; invalid events get CALIB 0.
    `cal` defaults to `get_cal(TELE_NUM)`.
    """
    cols, header = tv.event_columns(level1b)
    cal = cal or get_cal_mod.get_cal(int(header["TELE_NUM"]))
    t = cols["TIME"]
    if t.size:
        sec = np.floor(t - t.min()).astype(np.int64)
        rate_cps = np.bincount(sec)[sec].astype(np.float64)
    else:
        rate_cps = np.zeros(0)
    dead = 1.0 / (1.0 - np.clip(rate_cps * cal.dead_time_s, 0.0, 0.5))
    calib = np.where(cols["VALIDITY"] == 0, dead / cal.throughput, 0.0)
    cols["CALIB"] = calib.astype(np.float32)
    h = tv.product_header(header)
    h["GET_CAL"] = (get_cal_mod.VERSION, "version of module GET_CAL")
    h["APPL_CAL"] = (VERSION, "version of module APPL_CAL")
    h["THRUPUT"] = (cal.throughput, "relative throughput applied")
    h["DEADTIME"] = (cal.dead_time_s, "[s] dead time per event")
    return tv.event_table("1c", cols, h)
