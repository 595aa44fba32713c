"""ISOCAM transient correction: invert the lagging-fraction detector memory model in time."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.instruments import isocam as ic

VERSION = "TRANSIENT 1.0"


def correct_transient(rate_adug_s: NDArray[np.floating], t_start_s: NDArray[np.floating],
                      tint_s: NDArray[np.floating], *,
                      model: ic.TransientModel = ic.TRANSIENT,
                      initial_adug_s: NDArray[np.floating] | None = None) -> NDArray[np.float64]:
    """Recover the incident photocurrent S from measured pair rates m (n, 1024), in time order.

    Model (`isocam.TransientModel`): m = (1 - f) S + f <L>, dL/dt = (S - L)/tau with S constant
    during a pair; <L> = S + (L0 - S) c, c = (tau/T)(1 - exp(-T/tau)). Hence
    S = (m - f c L0) / (1 - f c), and L relaxes towards S until the next pair's start.
    `initial_adug_s` is L before the first pair (default: the per-pixel median of all rows,
    i.e. the background the detector saw before the observation). One numpy step per pair.
    """
    m = np.asarray(rate_adug_s, dtype=np.float64)
    t0 = np.asarray(t_start_s, dtype=np.float64)
    tint = np.asarray(tint_s, dtype=np.float64)
    f, tau = model.fraction, model.tau_s
    if initial_adug_s is None:  # dead pixels (NaN) stay NaN; avoid all-NaN median warnings
        lag = np.median(np.where(np.isfinite(m), m, 0.0), axis=0)
    else:
        lag = np.asarray(initial_adug_s, dtype=np.float64).copy()
    out = np.empty_like(m)
    for k in range(m.shape[0]):  # recursion in time; vectorised over the 1024 pixels
        c = tau / tint[k] * (1.0 - np.exp(-tint[k] / tau))
        s = (m[k] - f * c * lag) / (1.0 - f * c)
        out[k] = s
        dt = (t0[k + 1] - t0[k]) if k + 1 < m.shape[0] else tint[k]
        lag = s + (lag - s) * np.exp(-dt / tau)
    return out
