"""24 um first-frame and early-DCE effect: DCENUM 0..2 respond low; correct and flag them."""

from __future__ import annotations

import numpy as np

from services.calibrate.mips.steps import COMPLETE, StepRecord
from shared.instruments.mips import MaskBit


def dce_response(dcenum: int, *, first_dce_depression: float, early_dce_depression: float) -> float:
    """Relative response of a DCE: 1 - first depression (DCENUM 0), 1 - early (1, 2), else 1."""
    if dcenum == 0:
        return 1.0 - first_dce_depression
    if dcenum in (1, 2):
        return 1.0 - early_dce_depression
    return 1.0


def correct_first_frames(
    signal: np.ndarray,
    var: np.ndarray,
    dcenum: int,
    *,
    first_dce_depression: float,
    early_dce_depression: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, StepRecord]:
    """Divide by the DCE response and flag FIRST_DCE (DCENUM 0) or EARLY_DCE (1, 2).

    The depression sizes are not confirmed by the handbooks (seed 001 says 10-15% and ~2%):
    they are parameters. The flag stays so that the mosaic can still drop these frames.
    """
    f = dce_response(
        dcenum, first_dce_depression=first_dce_depression, early_dce_depression=early_dce_depression
    )
    mask = np.zeros(signal.shape, dtype=np.int32)
    if dcenum == 0:
        mask |= int(MaskBit.FIRST_DCE)
    elif dcenum in (1, 2):
        mask |= int(MaskBit.EARLY_DCE)
    lines = (
        f"DCECORR: DCENUM {dcenum} response {f:.4f} (first {first_dce_depression:g}, "
        f"early {early_dce_depression:g})",
    )
    record = StepRecord("DCECORR", COMPLETE, lines, cards={"DCERESP": (f, "relative DCE response")})
    return signal / f, var / f**2, mask, record
