"""ISOCAM dark subtraction: remove the dark-current model (ADU/G/s) from pair rates."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.instruments import isocam as ic


def subtract_dark(rate_adug_s: NDArray[np.floating], *,
                  dark_adug_s: NDArray[np.floating] | None = None) -> NDArray[np.float64]:
    """(n, 1024) pair rates minus the dark model (default: `isocam.dark_model()`)."""
    dark = ic.dark_model() if dark_adug_s is None else np.asarray(dark_adug_s)
    return np.asarray(rate_adug_s, dtype=np.float64) - dark.reshape(1, ic.NPIX)
