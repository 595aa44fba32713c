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

    Pure numpy, single threaded: segment kinds, telescope ids and LOG codes come from uint8
    reads of the segments' first and last bytes; the 40-bit values from one masked read of a
    strided '>u8' view (`segments_from_frames`), split with shifts and masks for the events
    only. An event's time is the value of the last TIME segment before it, found by a running
    count of TIME segments.
    """
    fr = np.ascontiguousarray(frames, dtype=np.uint8).reshape(-1, tv.FRAME_BYTES)
    # Flat (downlink order) arrays; 1-D index arrays are several times faster than 2-D ones.
    first = tv.segment_bytes(fr, 0).ravel()  # bits 39..32: telescope id (EVENT), code (LOG)
    typ = (tv.segment_bytes(fr, tv.SEGMENT_BYTES - 1) & np.uint8(tv.TYPE_MASK)).ravel()
    tele = first >> np.uint8(tv.EVENT_TELE_SHIFT - 32)
    is_event = typ == tv.SegmentType.EVENT
    is_time = typ == tv.SegmentType.TIME
    good_event = is_event & (tele != 0)
    ev = np.flatnonzero(good_event)
    n_broken = int(np.count_nonzero(typ == tv.SegmentType.RESERVED)
                   + np.count_nonzero(is_event) - ev.size
                   + np.count_nonzero(~tv.LOG_CODE_KNOWN[first[typ == tv.SegmentType.LOG]]))
    seg = tv.segments_from_frames(fr).ravel()
    time_idx = np.flatnonzero(is_time)
    n_time = int(time_idx.size)
    # Index (among TIME segments) of the last TIME segment before each event; -1 = untimed.
    last = np.cumsum(is_time, dtype=np.intp)[ev] - 1
    untimed = last < 0
    if n_time:
        times = ((seg[time_idx] >> np.uint64(tv.TIME_SHIFT)) & np.uint64(tv.TIME_MASK)).astype(
            np.int64)
        # Events before the first TIME segment get its value (index 0).
        ev_time = times[np.maximum(last, 0)]
    else:
        ev_time = np.zeros(ev.size, dtype=np.int64)
    es = seg[ev]
    cm = np.uint64(tv.CHARGE_MASK)
    return DecodedEvents(
        tele=tele[ev].astype(np.int8),
        w=((es >> np.uint64(tv.EVENT_W_SHIFT)) & cm).astype(np.int16),
        s=((es >> np.uint64(tv.EVENT_S_SHIFT)) & cm).astype(np.int16),
        z=((es >> np.uint64(tv.EVENT_Z_SHIFT)) & cm).astype(np.int16),
        time_ms=ev_time,
        n_time=n_time, n_broken=n_broken, n_untimed=int(np.count_nonzero(untimed)),
    )
