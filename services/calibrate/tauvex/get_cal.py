"""TAUVEX GET_CAL module: fetch the calibration reference data of a telescope."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["GET_CAL"]

XYFunc = Callable[[NDArray[np.floating], NDArray[np.floating]], NDArray[np.float64]]
DistFunc = Callable[
    [NDArray[np.floating], NDArray[np.floating]], tuple[NDArray[np.float64], NDArray[np.float64]]
]


@dataclass(frozen=True, slots=True)
class CalibrationReference:
    """Calibration reference data for one telescope (the pipeline's "calibration files")."""

    tele: int
    throughput: float  #: relative throughput (CALIB = 1/throughput before flat); 1 = nominal
    dead_time_s: float  #: per-event dead time for the dead-time correction (0 = none)
    flat: XYFunc  #: relative response at detector X, Y (px)
    distortion: DistFunc  #: ideal focal-plane X, Y (px) -> detector X, Y (px)
    ujy_per_cps: float  #: flux conversion of the telescope's filter (assumed)


def get_cal(tele: int) -> CalibrationReference:
    """Calibration reference data for telescope `tele` (1..3)."""
    if tele not in tv.TELESCOPES:
        raise ValueError(f"TELE_NUM {tele} is not a TAUVEX telescope (expected 1, 2 or 3)")
    return CalibrationReference(
        tele=tele, throughput=1.0, dead_time_s=0.0, flat=tv.flat_field,
        distortion=tv.distortion, ujy_per_cps=tv.TELESCOPES[tele].filter.ujy_per_cps,
    )
