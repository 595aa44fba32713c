"""Dark subtraction: remove the dark current (DN/s) from the count rate."""

from __future__ import annotations

import numpy as np

from services.calibrate.mips.calfiles import CalImage
from services.calibrate.mips.steps import COMPLETE, SKIPPED, StepRecord
from shared.instruments.mips import MaskBit


def subtract_dark(
    rate_dn_s: np.ndarray,
    var_dn2_s2: np.ndarray,
    dark: CalImage | None,
    *,
    dark_unc_dn_s: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, StepRecord]:
    """Subtract the DARK image (DN/s) and add its variance.

    Returns (rate DN/s, variance (DN/s)^2, mask bits, record). Without a dark the rate is
    returned unchanged, every pixel flagged NO_CALIBRATION and the step recorded SKIPPED;
    non-finite dark pixels are flagged NO_CALIBRATION and left uncorrected. The variance uses
    the file's UNC plane when it has one, else `dark_unc_dn_s`.
    """
    mask = np.zeros(rate_dn_s.shape, dtype=np.int32)
    if dark is None:
        mask |= int(MaskBit.NO_CALIBRATION)
        return rate_dn_s, var_dn2_s2, mask, StepRecord("DARKSUB", SKIPPED, ("DARKSUB: no DARK",))
    bad = ~np.isfinite(dark.data)
    mask[bad] |= int(MaskBit.NO_CALIBRATION)
    unc = dark.unc if dark.unc is not None else np.full(rate_dn_s.shape, dark_unc_dn_s)
    out = rate_dn_s - np.where(bad, 0.0, dark.data)
    var = var_dn2_s2 + np.where(np.isfinite(unc), unc, 0.0) ** 2
    lines = (f"DARKSUB: subtracted {dark.name} (DN/s), dark unc {dark_unc_dn_s:g} DN/s if no UNC",)
    return out, var, mask, StepRecord("DARKSUB", COMPLETE, lines, ("DARKFILE", dark.name))
