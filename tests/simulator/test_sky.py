"""The synthetic sky: power-law spectra, and pixel-integrated rendering that conserves flux."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from shared.instruments import mips
from simulator import sky as skymod

RA0, DEC0 = 150.1, 2.2


def _sky(n: int = 30, seed: int = 3) -> skymod.Sky:
    return skymod.make_sky(
        ra_deg=RA0, dec_deg=DEC0, half_size_arcsec=100.0, n_sources=n,
        flux_24_min_ujy=100.0, flux_24_max_ujy=1e4, seed=seed,
    )  # fmt: skip


def _one(sky: skymod.Sky, i: int) -> skymod.Sky:
    return skymod.Sky(sky.ra0_deg, sky.dec0_deg, sky.sources[i : i + 1], sky.background)


def _tan_grid(pix_arcsec: float, n: int) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.cdelt = [-pix_arcsec / 3600.0, pix_arcsec / 3600.0]
    return w


def test_make_sky_is_seeded_and_spans_blue_and_red_sources() -> None:
    a, b = _sky(200, seed=5), _sky(200, seed=5)
    assert np.array_equal(a.sources["flux_24_ujy"], b.sources["flux_24_ujy"])
    assert not np.array_equal(a.sources["flux_24_ujy"], _sky(200, seed=6).sources["flux_24_ujy"])
    f24 = np.asarray(a.sources["flux_24_ujy"])
    assert f24.min() >= 100.0 and f24.max() <= 1e4
    ratio = np.asarray(a.sources["flux_70_ujy"]) / f24
    # alpha in [-1, 2.5]: some sources fade at 70 um, others brighten by > 10x
    assert (ratio < 0.5).sum() > 10 and (ratio > 5).sum() > 10
    assert set(a.sources.colnames) >= {
        "id",
        "ra",
        "dec",
        "flux_24_ujy",
        "flux_70_ujy",
        "flux_160_ujy",
    }


@pytest.mark.parametrize("channel", [1, 2, 3])
def test_render_conserves_flux_on_the_distorted_array(channel: int) -> None:
    """sum(MJy/sr x true pixel solid angle) = flux to 0.5% for a source inside the array."""
    band = mips.BANDS[channel]
    sky = skymod.make_sky(
        ra_deg=RA0, dec_deg=DEC0, n_sources=3,
        half_size_arcsec=band.pixel_arcsec * min(band.nrows, band.ncols) / 6,
        flux_24_min_ujy=500.0, flux_24_max_ujy=5000.0, seed=11,
    )  # fmt: skip
    w = WCS(fits.Header(mips.wcs_keywords(channel, ra_deg=RA0, dec_deg=DEC0, pa_deg=40.0)))
    yy, xx = np.mgrid[0 : band.nrows, 0 : band.ncols]
    area = skymod.pixel_area_arcsec2(w, xx.ravel(), yy.ravel()).reshape(yy.shape)
    for i in range(3):
        one = _one(sky, i)
        img = skymod.render(one, channel, w, (band.nrows, band.ncols), include_background=False)
        flux = (img * area).sum() * mips.SR_PER_ARCSEC2 * 1e12
        truth = float(one.sources[one.flux_column(channel)][0])
        if channel == 3:
            # 2x20 array: only the fraction of the PSF that falls on it can be compared
            assert 0 < flux <= truth * 1.005
        else:
            assert flux == pytest.approx(truth, rel=0.005)


def test_render_on_a_mosaic_grid_and_nominal_area() -> None:
    """On an undistorted 2.45" grid every source's flux = sum x pixel solid angle (0.5%)."""
    sky = _sky(30)
    n = 120
    w = _tan_grid(2.45, n)
    img = skymod.render(sky, 1, w, (n, n), include_background=False)
    total = img.sum() * mips.BANDS[1].ujy_per_mjysr_mosaic_pixel
    xs, ys = w.all_world2pix(sky.sources["ra"], sky.sources["dec"], 0)
    inside = (xs > 8) & (xs < n - 9) & (ys > 8) & (ys < n - 9)
    assert inside.all(), "test sky must lie inside the grid"
    assert total == pytest.approx(float(np.sum(sky.sources["flux_24_ujy"])), rel=0.005)


def test_exact_and_subsampled_pixel_integration_agree() -> None:
    """The erf path and the sub-pixel path integrate the same Gaussian (0.3% per pixel)."""
    w = WCS(fits.Header(mips.wcs_keywords(1, ra_deg=RA0, dec_deg=DEC0, pa_deg=40.0)))
    x, y = np.array([60.3]), np.array([70.7])
    jac = skymod._jacobian_arcsec(w, x, y)
    sigma = 5.9 / 2.3548
    a = skymod._render_erf(x, y, np.array([1000.0]), jac, sigma, 7, 5, 128, 128)
    b = skymod._render_stamps(x, y, np.array([1000.0]), jac, sigma, 7, 9, 128, 128)
    assert np.abs(a - b).max() < 0.003 * a.max()
    assert a.sum() == pytest.approx(b.sum(), rel=1e-6)


def test_airy_psf_renders_the_diffraction_pattern() -> None:
    """With `airy_obscuration` a source is the obscured Airy pattern of the 85 cm mirror:
    on the 2.45" grid its flux within 10 lambda/D (what is drawn) is the analytic encircled
    energy there (1%), its FWHM ~1.0 lambda/D (5.8" at 24 um) and the first ring shows."""
    from scipy.special import j0, j1

    sky = _one(_sky(5), 0)
    n = 121
    w = _tan_grid(2.45, n)
    img = skymod.render(sky, 1, w, (n, n), include_background=False, airy_obscuration=0.0)
    flux = img.sum() * mips.BANDS[1].ujy_per_mjysr_mosaic_pixel
    truth = float(sky.sources["flux_24_ujy"][0])
    v = np.pi * 10.0  # unobscured EE(10 lambda/D) = 1 - J0^2 - J1^2: 0.980
    assert flux / truth == pytest.approx(1 - j0(v) ** 2 - j1(v) ** 2, rel=0.01)
    x, y = (float(c[0]) for c in w.all_world2pix(sky.sources["ra"], sky.sources["dec"], 0))
    yy, xx = np.indices(img.shape)
    r = np.hypot(xx - x, yy - y) * 2.45  # arcsec
    lod = mips.BANDS[1].lambda_over_d_arcsec
    half = img.max() / 2
    assert 0.9 * lod < 2 * r[img > half].max() < 1.25 * lod  # the FWHM, to the pixels' grain
    dark = img[(r > 1.1 * lod) & (r < 1.35 * lod)].mean()
    ring = img[(r > 1.5 * lod) & (r < 1.8 * lod)].mean()
    assert ring > 1.2 * dark  # a ring beyond the first dark one (a Gaussian only falls)


def test_interpolated_airy_pattern_is_the_pattern() -> None:
    # The renderer reads the pattern from a fine radial table: within 1e-6 of the peak out
    # to the table's reach (rings and dark zeros included), the exact values beyond it.
    lod = mips.BANDS[2].lambda_over_d_arcsec
    for eps in (0.0, 0.3):
        r = np.concatenate([np.linspace(0.0, 30.0 * lod, 200_001), [0.5 * lod]])
        r2 = (r * r).reshape(-1, 1)
        exact = skymod.airy_per_arcsec2(r2, lambda_over_d_arcsec=lod, obscuration=eps)
        got = skymod._airy_interpolated(r2, lambda_over_d_arcsec=lod, obscuration=eps)
        assert got.shape == exact.shape
        assert np.max(np.abs(got - exact)) < 1e-6 * exact[0, 0]
        beyond = r > skymod._AIRY_TABLE_LODS * lod
        np.testing.assert_array_equal(got[beyond], exact[beyond])


def test_background_is_a_linear_gradient() -> None:
    sky = _sky(1)
    level, ge, gn = sky.background[1]
    ra, dec = skymod.tangent_to_sky(
        np.array([0.0, 60.0, 0.0]), np.array([0.0, 0.0, 60.0]), RA0, DEC0
    )
    bg = sky.background_mjysr(1, ra, dec)
    assert bg == pytest.approx([level, level + ge, level + gn], rel=1e-9)


def test_tangent_round_trip() -> None:
    xi = np.array([-300.0, 0.0, 45.5])
    eta = np.array([10.0, -200.0, 300.0])
    ra, dec = skymod.tangent_to_sky(xi, eta, RA0, DEC0)
    xi2, eta2 = skymod.tangent_offsets_arcsec(ra, dec, RA0, DEC0)
    assert np.allclose(xi2, xi, atol=1e-8) and np.allclose(eta2, eta, atol=1e-8)
