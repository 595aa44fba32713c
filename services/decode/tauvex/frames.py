"""Vectorised TAUVEX frame decoder: (n, 128) major frames -> photon events with clock times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.instruments import tauvex as tv


@dataclass(frozen=True, slots=True)
class DecodedEvents:
    """Events of a run of major frames, in downlink order."""

    tele: NDArray[np.int8]  #: telescope 1..3
    w: NDArray[np.int16]  #: wedge charge (ADC counts)
    s: NDArray[np.int16]  #: strip charge
    z: NDArray[np.int16]  #: zigzag charge
    time_ms: NDArray[np.int64]  #: spacecraft clock of the last TIME segment before the event
    n_time: int  #: TIME segments seen
    n_broken: int  #: segments skipped as broken (reserved type, telescope 0, unknown LOG code)
    n_untimed: int  #: events before the first TIME segment (given the first TIME value)


def decode_frames(frames: NDArray[np.uint8]) -> DecodedEvents:
    """Decode data major frames (sync already checked, filler removed) into events.

    Pure numpy: the 40-bit segments are read through '>u8' views and split with shifts and
    masks; event times come from a running maximum over TIME segment positions.
    """
    fr = np.asarray(frames, dtype=np.uint8).reshape(-1, tv.FRAME_BYTES)
    seg = tv.segments_from_frames(fr).ravel()
    typ = (seg & np.uint64(tv.TYPE_MASK)).astype(np.uint8)
    tele = ((seg >> np.uint64(tv.EVENT_TELE_SHIFT)) & np.uint64(tv.EVENT_TELE_MASK)).astype(
        np.int8)
    is_event = typ == tv.SegmentType.EVENT
    is_time = typ == tv.SegmentType.TIME
    good_event = is_event & (tele > 0)
    code = (seg >> np.uint64(tv.LOG_CODE_SHIFT)) & np.uint64(tv.LOG_CODE_MASK)
    is_log = typ == tv.SegmentType.LOG
    n_broken = int(np.count_nonzero(typ == tv.SegmentType.RESERVED)
                   + np.count_nonzero(is_event & (tele == 0))
                   + np.count_nonzero(is_log & ~np.isin(code, [int(c) for c in tv.LogCode])))
    # Index of the last TIME segment at or before each segment (-1 before the first one).
    pos = np.where(is_time, np.arange(seg.size), -1)
    last_time = np.maximum.accumulate(pos) if seg.size else pos
    times = ((seg >> np.uint64(tv.TIME_SHIFT)) & np.uint64(tv.TIME_MASK)).astype(np.int64)
    ev = np.nonzero(good_event)[0]
    ev_last = last_time[ev]
    untimed = ev_last < 0
    n_time = int(np.count_nonzero(is_time))
    first_time = times[np.argmax(is_time)] if n_time else 0
    ev_time = np.where(untimed, first_time, times[np.maximum(ev_last, 0)])
    es = seg[ev]
    cm = np.uint64(tv.CHARGE_MASK)
    return DecodedEvents(
        tele=tele[ev],
        w=((es >> np.uint64(tv.EVENT_W_SHIFT)) & cm).astype(np.int16),
        s=((es >> np.uint64(tv.EVENT_S_SHIFT)) & cm).astype(np.int16),
        z=((es >> np.uint64(tv.EVENT_Z_SHIFT)) & cm).astype(np.int16),
        time_ms=ev_time.astype(np.int64),
        n_time=n_time, n_broken=n_broken, n_untimed=int(np.count_nonzero(untimed)),
    )
