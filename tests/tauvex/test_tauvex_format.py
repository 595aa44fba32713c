"""Level 0 format and round trip: decoded events equal the simulated ones bit for bit."""

from __future__ import annotations

import numpy as np

from services.decode import tauvex as dec
from shared.instruments import tauvex as tv
from simulator import tauvex as sim_mod


def test_frame_geometry_and_filler() -> None:
    assert tv.SYNC_BYTES + tv.SEGMENTS_PER_FRAME * tv.SEGMENT_BYTES == tv.FRAME_BYTES == 128
    assert tv.FILLER_FRAME[:8].tobytes() == tv.SYNC_WORD
    assert tv.FILLER_FRAME[8:13].tobytes() == tv.FILLER_SEGMENT_BYTES
    # LOG segments end in bits 10; so does the filler (it is LOG code FILL).
    assert tv.log_segment(tv.LogCode.START, 5) & 0b11 == 0b10
    assert tv.FILLER_SEGMENT & 0b11 == tv.SegmentType.LOG
    assert tv.FILLER_SEGMENT >> tv.LOG_CODE_SHIFT == tv.LogCode.FILL


def test_segment_pack_unpack_extremes() -> None:
    tele = np.array([1, 2, 3, 3])
    w = np.array([0, 4095, 1234, 1])
    s = np.array([4095, 0, 2345, 2])
    z = np.array([7, 4095, 3456, 3])
    segs = np.concatenate([tv.time_segment(np.array([0, tv.TIME_MASK])),
                           tv.event_segment(tele, w, s, z)])
    segs = np.concatenate([segs, np.full(24 - segs.size, tv.FILLER_SEGMENT, np.uint64)])
    frames = tv.frames_from_segments(segs.reshape(1, 24))
    ev = dec.decode_frames(frames)
    np.testing.assert_array_equal(ev.tele, tele)
    np.testing.assert_array_equal(ev.w, w)
    np.testing.assert_array_equal(ev.s, s)
    np.testing.assert_array_equal(ev.z, z)
    assert (ev.time_ms == tv.TIME_MASK).all()
    assert ev.n_time == 2 and ev.n_broken == 0


def test_round_trip_bit_for_bit(processed) -> None:  # type: ignore[no-untyped-def]
    e = processed.sim.events
    assert processed.level1.problems == []
    for k in (1, 2, 3):
        cols, h = tv.event_columns(processed.level1a[k])
        sel = e["tele"] == k
        assert h["NCOUNTS"] == sel.sum() > 1000
        for name in ("W", "S", "Z"):
            assert cols[name].dtype == np.int16
            np.testing.assert_array_equal(cols[name], e[name.lower()][sel])
        np.testing.assert_array_equal(np.rint(cols["TIME"] * 1000).astype(np.int64),
                                      e["time_ms"][sel])
        # VALIDATE flags exactly the simulated non-photon events.
        np.testing.assert_array_equal(cols["VALIDITY"] == 0, e["valid"][sel])


def test_simulator_is_deterministic() -> None:
    cfg = sim_mod.ScanConfig(seed=3, duration_s=3.0, n_sources=5)
    a, b = sim_mod.simulate_scan(cfg), sim_mod.simulate_scan(cfg)
    assert a.level0 == b.level0 and a.attitude == b.attitude
    assert sim_mod.simulate_scan(sim_mod.ScanConfig(seed=4, duration_s=3.0,
                                                    n_sources=5)).level0 != a.level0
