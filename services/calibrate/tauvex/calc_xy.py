"""TAUVEX CALC_XY module (Level 1b): detector X, Y from the wedge-strip-zigzag charge ratios."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["CALC_XY"]
#: Events whose measured position lies beyond the field radius by more than this are flagged;
#: the margin covers the geometric distortion (<~ 10 px) and the charge noise.
FIELD_MARGIN_PX = 20.0


def calc_xy(level1a: fits.HDUList) -> fits.HDUList:
    """Level 1a -> 1b: add X, Y (detector pixels, 0..1024) from x ~ W/(W+S+Z), y ~ S/(W+S+Z).

    Events outside the field circle (+ FIELD_MARGIN_PX) get ValidityBit.OUTSIDE_FIELD.
    """
    cols, header = tv.event_columns(level1a)
    x, y = tv.charge_to_xy(cols["W"], cols["S"], cols["Z"])
    r = np.hypot(x - tv.DETECTOR_CENTER_PX, y - tv.DETECTOR_CENTER_PX)
    outside = ~(r <= tv.FIELD_RADIUS_PX + FIELD_MARGIN_PX)  # NaN (zero charge) is outside too
    cols["VALIDITY"] = cols["VALIDITY"] | np.where(
        outside, int(tv.ValidityBit.OUTSIDE_FIELD), 0).astype(np.int32)
    cols["X"], cols["Y"] = x.astype(np.float32), y.astype(np.float32)
    h = tv.product_header(header)
    h["CALC_XY"] = (VERSION, "version of module CALC_XY")
    return tv.event_table("1b", cols, h)
