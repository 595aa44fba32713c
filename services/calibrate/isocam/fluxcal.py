"""ISOCAM flux calibration: ADU/G/s -> Jy with the point-source conversion of filter and lens."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.instruments import isocam as ic


def to_jy(rate_adug_s: NDArray[np.floating], *, filter_name: str, lens_arcsec: float,
          adug_s_per_jy: float | None = None) -> NDArray[np.float64]:
    """Rates (ADU/G/s per pixel) -> Jy per pixel; conversion from `isocam.flux_conversion`
    unless `adug_s_per_jy` is given."""
    conv = ic.flux_conversion(filter_name, lens_arcsec) if adug_s_per_jy is None else adug_s_per_jy
    return np.asarray(rate_adug_s, dtype=np.float64) / conv
