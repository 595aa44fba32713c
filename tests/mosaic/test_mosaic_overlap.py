"""Overlap solve at scale and the self-flat."""

from __future__ import annotations

import time

import mosaic_synth
import numpy as np
import pytest

from services.mosaic import build_mosaic
from services.mosaic.overlap import group_medians, solve_offsets
from services.mosaic.selfflat import SelfFlatError, make_self_flat


def test_solve_offsets_scales_to_thousands_of_frames() -> None:
    """A 3000-frame scan-like chain: each frame overlaps its neighbours in 20 cells."""
    rng = np.random.default_rng(11)
    n = 3000
    truth = rng.normal(0, 1.0, n)
    truth -= truth.mean()
    frame = np.repeat(np.arange(n), 40)
    # frame f covers cells 20f .. 20f+39: half shared with f-1, half with f+1
    cell = (frame * 20 + np.tile(np.arange(40), n)).astype(np.int64)
    sky = np.sin(cell / 50.0) * 3.0
    noise = 0.01
    value = sky + truth[frame] + rng.normal(0, noise, frame.size)
    weight = np.full(frame.size, 1.0 / noise**2)
    t0 = time.perf_counter()
    off = solve_offsets(frame, cell, value, weight, n_frames=n)
    _elapsed = time.perf_counter() - t0  # no timing assert (shared machine)
    assert off.sum() == pytest.approx(0.0, abs=1e-6)
    # each link (frame f vs f+1) is measured from 20 shared cells: error noise * sqrt(2/20)
    link = noise * np.sqrt(2 / 20)
    assert np.std(np.diff(off) - np.diff(truth)) == pytest.approx(link, rel=0.15)
    # and a chain random-walks: the offsets' error grows like link * sqrt(n)
    assert np.abs(off - truth).max() < 2.0 * link * np.sqrt(n)


def test_group_medians() -> None:
    keys = np.array([3, 1, 3, 1, 3, 7])
    vals = np.array([5.0, 2.0, 1.0, 4.0, 3.0, -1.0])
    uk, med, counts, inv = group_medians(keys, vals)
    assert list(uk) == [1, 3, 7]
    np.testing.assert_allclose(med, [3.0, 3.0, -1.0])
    assert list(counts) == [2, 3, 1]
    assert list(uk[inv]) == list(keys)


def test_self_flat_recovers_injected_flat() -> None:
    frames, _truth = mosaic_synth.make_frames(20, seed=9, n_cosmic=0, offsets_sigma=0.0)
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:128, 0:128]
    flat_true = 1.0 + 0.03 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 0.01, (128, 128))
    flat_true /= np.median(flat_true)
    flat_frames = [
        type(f)(
            data=(f.data * flat_true).astype(np.float32),
            unc=f.unc,
            mask=f.mask,
            header=f.header,
            key=f.key,
        )
        for f in frames
    ]
    flat = make_self_flat(
        [f.data for f in flat_frames], [np.ones((128, 128), dtype=bool)] * len(frames)
    )
    # noise of a 20-frame median of 0.05/20 MJy/sr pixels ~ 0.0004; the gradient adds ~0.2%
    assert np.nanstd(flat / flat_true) < 0.004
    m_flat = build_mosaic(flat_frames, self_flat=True)
    m_none = build_mosaic(flat_frames)
    assert m_flat.flat is not None
    deep_f = m_flat.coverage > 15
    deep_n = m_none.coverage > 15
    # high-pass both mosaics' deep areas: the self-flat removes the 3% pattern
    assert np.nanstd(np.diff(m_flat.image[deep_f])) < np.nanstd(np.diff(m_none.image[deep_n]))
    with pytest.raises(SelfFlatError):
        make_self_flat([f.data for f in frames[:2]], [np.ones((128, 128), bool)] * 2)
