"""ISOCAM calibration (Derive_SPD): CIER -> CISP pairs, dark, deglitch, transient, flat, CCIM."""

from services.calibrate.isocam.ccim import make_ccim
from services.calibrate.isocam.chain import SpdProducts, calibrate_observation
from services.calibrate.isocam.dark import subtract_dark
from services.calibrate.isocam.deglitch import Deglitched, find_glitches, glitch_list
from services.calibrate.isocam.flat import apply_flat
from services.calibrate.isocam.fluxcal import to_jy
from services.calibrate.isocam.spd import Disc, PixStat, derive_spd
from services.calibrate.isocam.transient import correct_transient

__all__ = [
    "Deglitched", "Disc", "PixStat", "SpdProducts", "apply_flat", "calibrate_observation",
    "correct_transient", "derive_spd", "find_glitches", "glitch_list", "make_ccim",
    "subtract_dark", "to_jy",
]
