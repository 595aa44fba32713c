"""TAUVEX VALIDATE module: flag events whose charges are not those of a photon."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["VALIDATE"]


def validity(
    w: NDArray[np.integer], s: NDArray[np.integer], z: NDArray[np.integer],
    *, charge_window: tuple[int, int] = tv.CHARGE_WINDOW,
) -> NDArray[np.int32]:
    """VALIDITY bits (`ValidityBit`, 0 = valid) from the total charge window and saturation.

    `charge_window` is the accepted range of W+S+Z in ADC counts (inclusive).
    """
    w32, s32, z32 = (np.asarray(a, dtype=np.int32) for a in (w, s, z))
    total = w32 + s32 + z32
    out = np.zeros(total.shape, dtype=np.int32)
    out |= np.where(total < charge_window[0], int(tv.ValidityBit.CHARGE_LOW), 0).astype(np.int32)
    out |= np.where(total > charge_window[1], int(tv.ValidityBit.CHARGE_HIGH), 0).astype(np.int32)
    sat = (w32 >= tv.CHARGE_MAX) | (s32 >= tv.CHARGE_MAX) | (z32 >= tv.CHARGE_MAX)
    out |= np.where(sat, int(tv.ValidityBit.SATURATED), 0).astype(np.int32)
    return out
