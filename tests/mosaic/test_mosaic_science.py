"""Science requirements of the mosaic, checked against the synthetic truth."""

from __future__ import annotations

import dataclasses

import mosaic_synth
import numpy as np
import pytest
from astropy.wcs import WCS

from services.mosaic import Mosaic, build_mosaic
from shared.instruments import mips


def _residual(m: Mosaic, truth: mosaic_synth.Truth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mosaic minus the true sky (and the common offset level the matching keeps)."""
    w = WCS(m.header)
    yy, xx = np.mgrid[0 : m.image.shape[0], 0 : m.image.shape[1]]
    ra, dec = w.all_pix2world(xx, yy, 0)
    return m.image - truth.sky(ra, dec) - truth.offsets.mean(), xx, yy


def _measure(m: Mosaic, truth: mosaic_synth.Truth, k: int) -> tuple[float, float, float]:
    """Flux (uJy, r = 8 px aperture minus annulus median) and centroid offset (px)."""
    resid, xx, yy = _residual(m, truth)
    px, py = WCS(m.header).all_world2pix(truth.ra_deg[k], truth.dec_deg[k], 0)
    r = np.hypot(xx - px, yy - py)
    bg = np.nanmedian(resid[(r > 10) & (r < 14)])
    img = resid - bg
    omega_sr = m.pixel_arcsec**2 * mips.SR_PER_ARCSEC2
    flux = float(np.nansum(img[r < 8])) * omega_sr * 1e12
    core = r < 3
    cx = np.nansum(img[core] * xx[core]) / np.nansum(img[core])
    cy = np.nansum(img[core] * yy[core]) / np.nansum(img[core])
    return flux, float(cx - px), float(cy - py)


def test_flux_conserved_within_1_percent(field, mosaic) -> None:
    _frames, truth = field
    for k in range(truth.flux_ujy.size):
        flux, _dx, _dy = _measure(mosaic, truth, k)
        assert flux / truth.flux_ujy[k] == pytest.approx(1.0, abs=0.01), k


def test_positions_within_a_tenth_of_a_pixel(field, mosaic) -> None:
    _frames, truth = field
    for k in range(truth.flux_ujy.size):
        _flux, dx, dy = _measure(mosaic, truth, k)
        assert np.hypot(dx, dy) < 0.1, (k, dx, dy)


def test_offsets_recovered_within_half_sigma_of_pixel_noise(field, mosaic) -> None:
    _frames, truth = field
    assert truth.offsets.std() > 3 * truth.noise_mjysr  # the injected offsets matter
    assert np.nansum(mosaic.offsets_mjysr) == pytest.approx(0.0, abs=1e-9)
    err = (truth.offsets - truth.offsets.mean()) - mosaic.offsets_mjysr
    assert np.max(np.abs(err)) < 0.5 * truth.noise_mjysr


def test_offsets_unmatched_when_switched_off(field) -> None:
    frames, _truth = field
    m = build_mosaic(frames, match_background=False, outlier_sigma=None)
    assert np.all(m.offsets_mjysr == 0.0)


def test_cosmic_rays_rejected_sources_kept(field, mosaic) -> None:
    frames, truth = field
    caught = sum(bool(mosaic.rmasks[f][y, x]) for f, y, x in truth.cosmic)
    assert caught >= 0.95 * len(truth.cosmic)
    cosmic = {(f, y, x) for f, y, x in truth.cosmic}
    false = sum(
        int(v)
        for f, rm in enumerate(mosaic.rmasks)
        for v in [np.count_nonzero(rm) - sum(1 for c in cosmic if c[0] == f and rm[c[1], c[2]])]
    )
    n_pix = sum(f.data.size for f in frames)
    assert false < 1e-3 * n_pix
    # no pixel near a bright source is rejected: the clip tolerates undersampled PSFs
    for f, frame in enumerate(frames):
        px, py = frame.wcs.all_world2pix(truth.ra_deg, truth.dec_deg, 0)
        yy, xx = np.mgrid[0 : frame.data.shape[0], 0 : frame.data.shape[1]]
        near = np.zeros(frame.data.shape, dtype=bool)
        for x0, y0 in zip(px, py, strict=True):
            near |= np.hypot(xx - x0, yy - y0) < 4
        rejected_near = np.count_nonzero(mosaic.rmasks[f][near])
        crs_near = sum(1 for c in cosmic if c[0] == f and near[c[1], c[2]])
        assert rejected_near <= crs_near, f
    # and the mosaic at the cosmic rays is clean: nothing above 6 sigma of the noise
    resid, _xx, _yy = _residual(mosaic, truth)
    deep = mosaic.coverage > 10
    src_free = np.ones(resid.shape, dtype=bool)
    px, py = WCS(mosaic.header).all_world2pix(truth.ra_deg, truth.dec_deg, 0)
    for x0, y0 in zip(px, py, strict=True):
        src_free &= np.hypot(_xx - x0, _yy - y0) > 10
    z = resid[deep & src_free] / mosaic.unc[deep & src_free]
    assert np.nanmax(np.abs(z)) < 6.0


def test_without_clipping_cosmic_rays_show(field) -> None:
    """The clipping test above can fail: without it, the cosmic rays stay in the mosaic."""
    frames, truth = field
    m = build_mosaic(frames, outlier_sigma=None)
    resid, _xx, _yy = _residual(m, truth)
    deep = m.coverage > 10
    assert np.nanmax(np.abs(resid[deep] / m.unc[deep])) > 6.0
    assert m.n_outliers == 0


def test_coverage_and_uncertainty_maps(field, mosaic) -> None:
    frames, truth = field
    # total coverage = frames x (frame area / output pixel area), minus masked pixels
    frame_area = 128 * 128 * (2.55 / mosaic.pixel_arcsec) ** 2
    assert np.nansum(mosaic.coverage) == pytest.approx(len(frames) * frame_area, rel=0.01)
    assert mosaic.coverage.max() <= len(frames) + 1.5
    # the propagated unc matches the scatter of the sky where the coverage is deep
    resid, xx, yy = _residual(mosaic, truth)
    deep = mosaic.coverage > 20
    src_free = np.ones(resid.shape, dtype=bool)
    px, py = WCS(mosaic.header).all_world2pix(truth.ra_deg, truth.dec_deg, 0)
    for x0, y0 in zip(px, py, strict=True):
        src_free &= np.hypot(xx - x0, yy - y0) > 10
    sel = deep & src_free
    z = resid[sel] / mosaic.unc[sel]
    # drizzle correlates neighbouring pixels, and the per-pixel unc ignores it, so the
    # scatter is a bit below the propagated unc: accept 0.5..1.2
    assert 0.5 < np.std(z) < 1.2


def test_bad_frames_do_not_break_it(field) -> None:
    frames, truth = field
    bad = list(frames)
    bad[2] = dataclasses.replace(frames[2], unc=frames[2].unc * 1e-6)  # wildly wrong unc
    bad[5] = dataclasses.replace(frames[5], data=np.full_like(frames[5].data, np.nan))
    bad[7] = dataclasses.replace(frames[7], unc=np.zeros_like(frames[7].unc))
    m = build_mosaic(bad)
    assert not m.used[5] and not m.used[7]
    assert m.unc_scale[2] > 1e5
    assert any("unc rescaled" in n for n in m.notes)
    assert any("no valid pixel" in n for n in m.notes)
    for k in range(truth.flux_ujy.size):
        flux, dx, dy = _measure(m, truth, k)
        assert flux / truth.flux_ujy[k] == pytest.approx(1.0, abs=0.01), k
        assert np.hypot(dx, dy) < 0.1


def test_pixel_weighting_biases_bright_sources(field) -> None:
    """Why the default weights whole frames: per-pixel 1/unc^2 weights down-weight the frames
    whose pixels sit on a source's peak (their unc holds the source's Poisson noise)."""
    frames, truth = field
    m = build_mosaic(frames, weighting="pixel")
    flux, _dx, _dy = _measure(m, truth, 0)
    assert flux / truth.flux_ujy[0] < 0.97


def test_coverage_counts_frames_when_input_pixels_are_much_larger(field) -> None:
    """Output pixels 2.5x smaller than the input's (as MIPS 70 um: 9.98" on 4"): the drizzle
    footprint is capped at 2 output pixels a side, yet the coverage map still counts frames
    (total = frames x frame area)."""
    frames, _truth = field
    frames = frames[:6]
    m = build_mosaic(frames, pixel_arcsec=2.55 / 2.5, match_background=False, outlier_sigma=None)
    frame_area = 128 * 128 * 2.5**2
    assert np.nansum(m.coverage) == pytest.approx(len(frames) * frame_area, rel=0.01)
    assert np.nanmax(m.coverage) <= len(frames) + 1.5


def test_first_dce_dropped_only_for_arrays_with_a_first_frame_effect(field) -> None:
    """DCENUM 0 is skipped for MIPS 24 um (and any non-MIPS array) but used for the Ge:Ga
    channels, which have no first-frame effect."""
    frames, _truth = field

    def relabel(f, **cards):  # type: ignore[no-untyped-def]
        h = f.header.copy()
        h.update(cards)
        return dataclasses.replace(f, header=h)

    four = frames[:4]
    as24 = build_mosaic([relabel(four[0], DCENUM=0), *four[1:]], match_background=False)
    assert as24.n_frames_used == 3
    assert any("DCENUM 0" in note for note in as24.notes)
    ge = [relabel(f, CHNLNUM=2) for f in four]
    as70 = build_mosaic([relabel(ge[0], DCENUM=0), *ge[1:]], match_background=False)
    assert as70.n_frames_used == 4


@pytest.mark.parametrize("fwhm_px", [1.3, 1.8, 2.4])
def test_single_frame_spikes_find_hits_and_spare_point_sources(fwhm_px: float) -> None:
    """One-pixel hits (bright or faint, either sign) are spikes; pixel-integrated Gaussian
    point sources from 8 to 2000 sigma at every sub-pixel phase are not (every MIPS array
    samples its PSF with FWHM >= 1.8 pixels, IRAC's with >= 1.3)."""
    from scipy.special import erf

    from services.mosaic.outliers import single_frame_spikes

    rng = np.random.default_rng(5)
    ny, nx, unc = 96, 96, 0.05
    data = 20.0 + rng.normal(0.0, unc, (ny, nx))
    s = fwhm_px / 2.3548
    yy, xx = np.mgrid[0:ny, 0:nx]
    centres = [(12 + 14 * i + rng.uniform(-0.5, 0.5), 12 + 14 * j + rng.uniform(-0.5, 0.5))
               for i in range(6) for j in range(6)]
    amps = np.geomspace(8.0, 2000.0, len(centres)) * unc * 2 * np.pi * s * s
    r2 = s * np.sqrt(2.0)
    for (x0, y0), a in zip(centres, amps, strict=True):
        gx = 0.5 * (erf((xx - x0 + 0.5) / r2) - erf((xx - x0 - 0.5) / r2))
        gy = 0.5 * (erf((yy - y0 + 0.5) / r2) - erf((yy - y0 - 0.5) / r2))
        data += a * gx * gy
    hits = [(5, 5, 30.0), (90, 40, -40.0), (50, 6, 8.0), (6, 90, 200.0)]
    for y, x, z in hits:
        data[y, x] += z * unc
    spikes = single_frame_spikes(data, np.full(data.shape, unc), np.ones(data.shape, bool))
    assert all(spikes[y, x] for y, x, _ in hits)
    assert np.count_nonzero(spikes) == len(hits)


def test_hits_in_shallow_stacks_are_rejected(field) -> None:
    """Where the stack is too shallow for the temporal clip (a mosaic's edge) a one-pixel hit
    is still rejected, and so are two hits on one sky position in a 3-frame stack (their
    median would otherwise follow them)."""
    frames, _truth = field
    three = [dataclasses.replace(f, data=f.data.copy()) for f in frames[1:4]]
    noise = float(np.median(three[0].unc))
    ra, dec = three[0].wcs.all_pix2world(64.0, 64.0, 0)
    spots = []
    for f in three[:2]:
        x, y = (round(float(v)) for v in f.wcs.all_world2pix(ra, dec, 0))
        f.data[y, x] += 50.0 * noise
        spots.append((y, x))
    three[2].data[125, 125] += 80.0 * noise  # near a corner only this frame covers
    m = build_mosaic(three, match_background=False)
    assert all(m.rmasks[i][y, x] for i, (y, x) in enumerate(spots))
    assert m.rmasks[2][125, 125]
    cra, cdec = three[2].wcs.all_pix2world(125.0, 125.0, 0)
    cx, cy = (round(float(v)) for v in WCS(m.header).all_world2pix(cra, cdec, 0))
    assert m.coverage[cy, cx] < 3  # the temporal clip could not judge it
    # the two-hit sky position is clean in the mosaic
    mx, my = (round(float(v)) for v in WCS(m.header).all_world2pix(ra, dec, 0))
    local = m.image[my - 3 : my + 4, mx - 3 : mx + 4]
    assert np.nanmax(np.abs(local - np.nanmedian(local))) < 10.0 * noise
