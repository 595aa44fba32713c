"""Ge responsivity tracking: stim flash minus background, interpolated in time to every DCE."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StimMeasurement:
    """Responsivity measured by one stim DCE (DN/s per instrument unit, flat removed)."""

    time_s: float
    responsivity: float
    responsivity_unc: float
    n_pixels: int
    valid: bool


@dataclass(frozen=True, slots=True)
class Responsivity:
    """Responsivity applied to one science DCE and how it was obtained."""

    value: float  #: DN/s per instrument unit
    no_stim: bool  #: True when nearest-in-time was used (or no stim at all: value 1)
    method: str  #: "interp", "nearest", "none"


def measure_stims(
    times_s: Sequence[float],
    signals_dn_s: Sequence[np.ndarray],
    is_stim: Sequence[bool],
    good: Sequence[np.ndarray],
    flat: np.ndarray,
    *,
    stim_level_iu: float,
    min_responsivity: float,
    stim_pattern: np.ndarray | None = None,
) -> list[StimMeasurement]:
    """R(t_stim) = median over good pixels of (stim - background) / (STIMLVL * flat).

    `signals_dn_s` are dark-subtracted rates (DN/s) of all DCEs of one AOR+channel in time
    order; the background of a stim DCE is the mean of the nearest non-stim DCE before and
    after it (one side if only one exists). The median over pixels keeps sources that move
    between dithers from biasing the result. Measurements below `min_responsivity` (e.g. a
    stim fainter than its background) are marked invalid. `stim_pattern` is the relative
    illumination of the stim over the array (the STIM file image, 1 where absent).
    """
    pattern = np.ones_like(flat) if stim_pattern is None else stim_pattern
    usable_pattern = np.isfinite(pattern) & (pattern > 0)
    pattern = np.where(usable_pattern, pattern, 1.0)
    times = np.asarray(times_s, dtype=np.float64)
    stim = np.asarray(is_stim, dtype=bool)
    science_idx = np.flatnonzero(~stim)
    out: list[StimMeasurement] = []
    for i in (int(k) for k in np.flatnonzero(stim)):
        before = science_idx[science_idx < i]
        after = science_idx[science_idx > i]
        neighbours = ([int(before[-1])] if before.size else []) + (
            [int(after[0])] if after.size else []
        )
        if not neighbours:
            out.append(StimMeasurement(float(times[i]), float("nan"), float("nan"), 0, False))
            continue
        background = np.mean([signals_dn_s[j] for j in neighbours], axis=0)
        usable = good[i] & np.logical_and.reduce([good[j] for j in neighbours])
        usable &= np.isfinite(signals_dn_s[i]) & np.isfinite(background) & (flat > 0)
        usable &= usable_pattern
        ratio = ((signals_dn_s[i] - background) / (stim_level_iu * pattern * flat))[usable]
        if ratio.size < 3:
            out.append(StimMeasurement(float(times[i]), float("nan"), float("nan"), 0, False))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = float(np.median(ratio))
            mad = float(np.median(np.abs(ratio - r)))
        # standard error of a median: 1.2533 sigma / sqrt(n), sigma from the MAD
        unc = 1.2533 * 1.4826 * mad / np.sqrt(ratio.size)
        out.append(StimMeasurement(float(times[i]), r, unc, int(ratio.size), r >= min_responsivity))
    return out


def responsivity_at(
    time_s: float, stims: Sequence[StimMeasurement], *, min_responsivity: float
) -> Responsivity:
    """Responsivity at `time_s`: linear interpolation between the stims that bracket it;
    nearest valid stim in time where that is unavailable (before the first / after the last
    stim, or an invalid bracketing stim) or below `min_responsivity`; 1.0 with no valid stim."""
    valid = [s for s in stims if s.valid]
    if not valid:
        return Responsivity(1.0, True, "none")
    t_all = np.array([s.time_s for s in stims])
    order = np.argsort(t_all)
    t_all = t_all[order]
    r_all = np.array([s.responsivity for s in stims])[order]
    ok_all = np.array([s.valid for s in stims])[order]
    k = int(np.searchsorted(t_all, time_s))
    if 0 < k < t_all.size and ok_all[k - 1] and ok_all[k]:
        t0, t1 = t_all[k - 1], t_all[k]
        w = 0.0 if t1 == t0 else (time_s - t0) / (t1 - t0)
        value = float((1.0 - w) * r_all[k - 1] + w * r_all[k])
        if value >= min_responsivity:
            return Responsivity(value, False, "interp")
    t_valid = np.array([s.time_s for s in valid])
    nearest = valid[int(np.argmin(np.abs(t_valid - time_s)))]
    return Responsivity(nearest.responsivity, True, "nearest")
