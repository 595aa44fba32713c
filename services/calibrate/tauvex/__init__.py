"""TAUVEX calibration: Level 1a -> 1g, one module per pipeline step (CALC_XY ... REGISTER)."""

from services.calibrate.tauvex.appl_cal import appl_cal
from services.calibrate.tauvex.calc_ra import calc_ra
from services.calibrate.tauvex.calc_xy import calc_xy
from services.calibrate.tauvex.chain import run_chain
from services.calibrate.tauvex.flat_fld import flat_fld
from services.calibrate.tauvex.geo_corr import geo_corr
from services.calibrate.tauvex.get_cal import CalibrationReference, get_cal
from services.calibrate.tauvex.register import register

__all__ = [
    "CalibrationReference", "appl_cal", "calc_ra", "calc_xy", "flat_fld", "geo_corr", "get_cal",
    "register", "run_chain",
]
