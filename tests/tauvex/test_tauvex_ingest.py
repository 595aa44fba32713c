"""Ingest: filler removal, observation split, and corrupted input counted and reported."""

from __future__ import annotations

import numpy as np
import pytest

from services.decode import tauvex as dec
from services.ingest import tauvex as ing
from shared.instruments import tauvex as tv
from simulator import tauvex as sim_mod


@pytest.fixture(scope="module")
def two_obs() -> sim_mod.TauvexSimulation:
    return sim_mod.simulate_scan(sim_mod.ScanConfig(seed=11, duration_s=4.0, n_observations=2,
                                                    n_sources=10))


def _frames(level0: bytes) -> np.ndarray:
    return np.frombuffer(level0, dtype=np.uint8).reshape(-1, tv.FRAME_BYTES).copy()


def _all_events(result: ing.Level1Result) -> dict[str, np.ndarray]:
    evs = [dec.decode_frames(o.frames) for o in result.observations]
    return {k: np.concatenate([getattr(e, k) for e in evs]) for k in ("tele", "w", "time_ms")}


def test_split_and_filler(two_obs) -> None:  # type: ignore[no-untyped-def]
    r = ing.level0_to_level1(two_obs.level0, two_obs.attitude)
    assert r.problems == []
    assert [o.obs_id for o in r.observations] == [1, 2]
    assert r.n_filler_frames + r.n_data_frames == r.n_frames
    for o, (_, t0, t1) in zip(r.observations, two_obs.observations, strict=True):
        assert t0 <= o.start_ms <= o.end_ms < t1
        assert len(o.attitude) > 10
        assert o.attitude["TIME"][0] <= o.start_ms / 1000 and o.attitude["TIME"][-1] >= (
            o.end_ms / 1000)
        back = tv.Level1Observation.from_bytes(o.to_bytes())
        np.testing.assert_array_equal(back.frames, o.frames)
        assert (back.obs_id, back.start_ms, back.end_ms) == (o.obs_id, o.start_ms, o.end_ms)
    ev = _all_events(r)
    np.testing.assert_array_equal(ev["w"], two_obs.events["w"])


def test_corrupted_input_is_reported_and_the_rest_decoded(two_obs) -> None:  # type: ignore
    fr = _frames(two_obs.level0)
    r0 = ing.level0_to_level1(two_obs.level0, two_obs.attitude)
    is_data = ~(fr[:, 8:] == tv.FILLER_FRAME[8:]).all(axis=1)
    data_idx = np.nonzero(is_data)[0]
    bad_sync = data_idx[[5, 40]]
    fixable = data_idx[60]
    fr[bad_sync, 0:2] ^= 0xFF  # 16 flipped sync bits: frame skipped
    fr[fixable, 3] ^= 0x01  # one flipped sync bit: frame kept
    garbage = data_idx[80]
    fr[garbage, 8 + 5 * 7: 8 + 5 * 8] = 0xFF  # segment 7 = reserved type: broken
    level0 = fr.tobytes() + fr[data_idx[90]].tobytes()[:77]  # truncated final frame
    r = ing.level0_to_level1(level0, two_obs.attitude)
    reasons = {p.reason.split(" (")[0]: p for p in r.problems}
    assert reasons["bad sync word"].count == 2
    assert set(reasons["bad sync word"].first_frames) == set(bad_sync.tolist())
    assert reasons["sync word with 1..3 bit errors"].count == 1
    assert reasons["broken segment"].count == 1
    assert reasons["broken segment"].first_frames == (int(garbage),)
    assert any(p.reason.startswith("truncated final frame") for p in r.problems)
    # Every event outside the two skipped frames and the broken segment is decoded.
    ev0 = _all_events(r0)
    ev = _all_events(r)
    lost = 0
    seg = tv.segments_from_frames(_frames(two_obs.level0)[bad_sync]).ravel()
    lost += int(np.count_nonzero((seg & 3) == tv.SegmentType.EVENT))
    seg_g = tv.segments_from_frames(_frames(two_obs.level0)[[garbage]]).ravel()
    lost += int((seg_g[7] & 3) == tv.SegmentType.EVENT)
    assert ev["w"].size == ev0["w"].size - lost
    assert r.observations[0].nframes == r0.observations[0].nframes - 2


def test_not_tauvex_raises() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ing.NotTauvexError, match="sync word"):
        ing.level0_to_level1(rng.integers(0, 256, 128 * 50, dtype=np.uint8).tobytes(), b"")
    with pytest.raises(ValueError, match="no complete"):
        ing.level0_to_level1(b"SIMPLE  =                    T", b"")


def test_bad_attitude_raises(two_obs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ing.AttitudeError):
        ing.level0_to_level1(two_obs.level0, b"not fits at all")
