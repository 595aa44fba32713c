"""Static masks: pmask bits and the 70 um bad half mapped onto the per-DCE status bits."""

from __future__ import annotations

import numpy as np

from services.calibrate.mips.calfiles import CalImage
from services.calibrate.mips.steps import COMPLETE, SKIPPED, StepRecord
from shared.instruments import mips
from shared.instruments.mips import MaskBit


def static_mask(
    channel: int, shape: tuple[int, int], pmask: CalImage | None
) -> tuple[np.ndarray, StepRecord]:
    """Status bits from the pmask: any nonzero pmask bit -> PMASK; at 70 um the Ge pmask bad
    half bit and rows 16..31 (always) -> BAD_HALF. Returns (int32 mask, record)."""
    mask = np.zeros(shape, dtype=np.int32)
    if channel == 2:
        mask[mips.MIPS70_GOOD_ROWS.stop :, :] |= int(MaskBit.BAD_HALF)
    if pmask is None:
        return mask, StepRecord("PMASKAPP", SKIPPED, ("PMASKAPP: no PMASK",))
    bits = pmask.data
    mask[bits != 0] |= int(MaskBit.PMASK)
    if channel in (2, 3):
        mask[(bits & mips.GE_PMASK_BAD_HALF) != 0] |= int(MaskBit.BAD_HALF)
    lines = (f"PMASKAPP: {pmask.name}: {int((bits != 0).sum())} pixels -> PMASK bit",)
    return mask, StepRecord("PMASKAPP", COMPLETE, lines, ("PMSKFILE", pmask.name))
