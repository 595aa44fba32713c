"""Spitzer MIPS calibration: raw DCEs (24 um slope/difference planes, Ge ramps) to BCDs.

Public entry points (pure: HDULists in, HDULists out):

- `calibrate_mips24_dce(raw, cal, config)`: one 24 um DCE -> `BCDProducts` (bcd, bunc, bbmsk).
- `calibrate_ge_group(raws, cal, config)`: all DCEs of one AOR and Ge channel (70 or 160 um),
  stim flashes included -> one `BCDProducts` (bcd, bunc, bmask, fbcd) per non-stim DCE.
- `MipsCalibration.from_hdus(hdus)`: the calibration files (DARK, FLAT, PMASK, STIM).
- `MipsCalibrateConfig`: the frozen parameters of every step.
"""

from services.calibrate.mips.bcd import BCDProducts
from services.calibrate.mips.calfiles import CalibrationFileError, MipsCalibration
from services.calibrate.mips.config import MipsCalibrateConfig
from services.calibrate.mips.errors import MipsCalibrateError, RawProductError
from services.calibrate.mips.pipeline import calibrate_ge_group, calibrate_mips24_dce

__all__ = [
    "BCDProducts",
    "CalibrationFileError",
    "MipsCalibrateConfig",
    "MipsCalibrateError",
    "MipsCalibration",
    "RawProductError",
    "calibrate_ge_group",
    "calibrate_mips24_dce",
]
