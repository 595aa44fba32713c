"""ISOCAM flat field: divide by the detector x optical flat (mean 1)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.instruments import isocam as ic


def apply_flat(rate_adug_s: NDArray[np.floating], *,
               flat: NDArray[np.floating] | None = None) -> NDArray[np.float64]:
    """(n, 1024) rates divided by the flat (default: `isocam.flat_model()`)."""
    f = ic.flat_model() if flat is None else np.asarray(flat)
    return np.asarray(rate_adug_s, dtype=np.float64) / f.reshape(1, ic.NPIX)
