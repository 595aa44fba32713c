"""Flat fielding: divide by the normalised pixel response (median 1)."""

from __future__ import annotations

import numpy as np

from services.calibrate.mips.calfiles import CalImage
from services.calibrate.mips.steps import COMPLETE, SKIPPED, StepRecord
from shared.instruments.mips import MaskBit


def divide_flat(
    signal: np.ndarray,
    var: np.ndarray,
    flat: CalImage | None,
    *,
    flat_unc_frac: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, StepRecord]:
    """Divide a dark-subtracted rate (any unit) by the FLAT and propagate its uncertainty.

    var_out = var / flat^2 + out^2 * (flat_unc / flat)^2, with flat_unc from the file's UNC
    plane or `flat_unc_frac * flat`. Non-finite or non-positive flat pixels are left
    uncorrected and flagged NO_CALIBRATION; a missing flat skips the step (all pixels flagged).
    """
    mask = np.zeros(signal.shape, dtype=np.int32)
    if flat is None:
        mask |= int(MaskBit.NO_CALIBRATION)
        return signal, var, mask, StepRecord("FLATFLD", SKIPPED, ("FLATFLD: no FLAT",))
    bad = ~np.isfinite(flat.data) | (flat.data <= 0)
    mask[bad] |= int(MaskBit.NO_CALIBRATION)
    f = np.where(bad, 1.0, flat.data)
    rel_unc = flat.unc / f if flat.unc is not None else np.full(signal.shape, flat_unc_frac)
    rel_unc = np.where(np.isfinite(rel_unc), rel_unc, 0.0)
    out = signal / f
    var_out = var / f**2 + out**2 * rel_unc**2
    lines = (f"FLATFLD: divided by {flat.name}, flat unc {flat_unc_frac:g} if no UNC",)
    return out, var_out, mask, StepRecord("FLATFLD", COMPLETE, lines, ("FLATFILE", flat.name))
