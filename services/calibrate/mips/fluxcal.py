"""Flux calibration: DN/s (24 um) or instrument units (Ge) to MJy/sr with the band's FLUXCONV."""

from __future__ import annotations

import numpy as np

from services.calibrate.mips.steps import COMPLETE, StepRecord
from shared.instruments import mips


def to_mjysr(
    signal: np.ndarray, var: np.ndarray, channel: int
) -> tuple[np.ndarray, np.ndarray, StepRecord]:
    """Multiply by FLUXCONV (MJy/sr per DN/s at 24 um, per instrument unit for Ge).

    The FLUXCONV uncertainty (2% at 24 um) is systematic to the whole AOR and is recorded in
    the header (FLUXUNC), not folded into bunc.
    """
    band = mips.BANDS[channel]
    lines = (f"FLUXCAL: FLUXCONV {band.fluxconv:g} MJy/sr per unit (+-{band.fluxconv_unc_frac:g})",)
    record = StepRecord(
        "FLUXCAL",
        COMPLETE,
        lines,
        cards={"FLUXUNC": (band.fluxconv_unc_frac, "fractional FLUXCONV uncertainty")},
    )
    return signal * band.fluxconv, var * band.fluxconv**2, record
