"""PRF fit, FWHM measurement and exact apertures: golden comparisons on seeded synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

from services.extract.photometry import aperture_fluxes, estimate_fwhm_px
from services.extract.prf import fit_point_sources, sigma_from_fwhm

from .synth import render_sources


def _field(seed: int, *, fwhm_px: float = 2.6, noise: float = 0.01, blends: bool = True):
    """Isolated sources (and a close pair and a triple) on a 160x150 image with white noise."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(20, 140, 20.0), np.arange(20, 130, 22.0))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    if blends:
        x = np.concatenate([x, [70.0, 72.6, 110, 112, 111]])
        y = np.concatenate([y, [140.0, 141.5, 140, 143, 145]])
    flux = rng.uniform(2.0, 20.0, x.size)
    sigma = sigma_from_fwhm(fwhm_px)
    img = render_sources((160, 150), x, y, flux, sigma_px=sigma, half_size=12)
    img += rng.normal(0.0, noise, img.shape)
    weight = np.full(img.shape, 1.0 / noise**2)
    return img, weight, x, y, flux


def test_joint_fit_recovers_truth_and_groups():
    img, w, x, y, flux = _field(3)
    rng = np.random.default_rng(4)
    fit = fit_point_sources(img, w, x0=x + rng.uniform(-0.4, 0.4, x.size),
                            y0=y + rng.uniform(-0.4, 0.4, y.size), flux0=flux * 0.8, fwhm_px=2.6)
    assert fit.converged
    # Errors are honest: normalised deviations have unit scatter (loose bounds, ~45 sources).
    for est, true, err in ((fit.flux, flux, fit.flux_err), (fit.x, x, fit.x_err),
                           (fit.y, y, fit.y_err)):
        z = (est - true) / err
        assert np.all(np.abs(z) < 5)
        assert 0.5 < np.std(z) < 1.6
    # The pair and the triple are fitted jointly; the grid sources alone.
    n_grid = x.size - 5
    assert np.all(fit.n_in_group[:n_grid] == 1)
    assert list(fit.n_in_group[n_grid:]) == [2, 2, 3, 3, 3]
    assert fit.group[n_grid] == fit.group[n_grid + 1] != fit.group[n_grid + 2]
    # The residual is noise.
    assert np.std(fit.residual) == pytest.approx(0.01, rel=0.1)


def test_fit_with_masked_pixels_and_edge_sources():
    img, w, x, y, flux = _field(5)
    w[60:80, :] = 0.0  # a masked band through one row of sources
    x = np.concatenate([x, [0.4, 148.8]])
    y = np.concatenate([y, [5.0, 150.0]])
    flux = np.concatenate([flux, [5.0, 5.0]])
    img = img + render_sources(img.shape, x[-2:], y[-2:], flux[-2:],
                               sigma_px=sigma_from_fwhm(2.6), half_size=12)
    fit = fit_point_sources(img, w, x0=x, y0=y, flux0=flux, fwhm_px=2.6)
    ok = np.isfinite(fit.flux_err)
    assert np.all(np.abs(fit.flux[ok] - flux[ok]) < 5 * fit.flux_err[ok])
    # A source whose every stamp pixel is masked has no constraint: infinite error.
    dead = fit.npix == 0
    assert np.all(~np.isfinite(fit.flux_err[dead]))


def test_fwhm_fit_agrees_with_trial_grid():
    # Blends inside the bright sources' stamps would broaden the estimate (by either method).
    img, w, *_ = _field(7, fwhm_px=2.9, noise=0.003, blends=False)
    fwhm = estimate_fwhm_px(img, w, guess_px=2.41)
    grid = estimate_fwhm_px(img, w, guess_px=2.41, grid=2.41 * np.geomspace(0.4, 2.5, 15))
    assert fwhm == pytest.approx(2.9, rel=0.01)
    assert fwhm == pytest.approx(grid, rel=0.002)


def test_fwhm_from_the_detection_pass_peaks():
    """The FWHM measured on the extraction's own detections (a matched filter of the guess,
    threshold 5) is the one measured with its own S/N > 20 filter pass."""
    from services.extract.detect import find_peaks, matched_filter

    # Noise for S/N ~5-50: the faint half is below the FWHM fit's S/N 20 cut.
    img, w, *_ = _field(7, fwhm_px=2.9, noise=0.08, blends=False)
    peaks = find_peaks(matched_filter(img, w, fwhm_px=2.41), threshold=5.0, valid=w > 0)
    assert np.any(peaks.snr < 20)  # the faint ones are there, and must be left out
    own = estimate_fwhm_px(img, w, guess_px=2.41)
    shared = estimate_fwhm_px(img, w, guess_px=2.41, peaks=peaks)
    assert shared == pytest.approx(2.9, rel=0.03)
    assert shared == pytest.approx(own, rel=0.002)


def test_exact_apertures_match_photutils():
    photutils = pytest.importorskip("photutils.aperture")
    rng = np.random.default_rng(11)
    img = rng.normal(size=(60, 70))
    unc = rng.uniform(0.5, 2.0, img.shape)
    mask = rng.random(img.shape) < 0.05
    x = rng.uniform(-1.0, 71.0, 200)
    y = rng.uniform(-1.0, 61.0, 200)
    for r in (0.3, 2.89, 7.5):
        ap = photutils.CircularAperture(np.column_stack([x, y]), r=r)
        tab = photutils.aperture_photometry(img, ap, error=unc, mask=mask, method="exact")
        s, e = aperture_fluxes(img, unc, x=x, y=y, radius_px=r, mask=mask)
        np.testing.assert_allclose(s, tab["aperture_sum"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(e, tab["aperture_sum_err"], rtol=0, atol=1e-9)


def test_refit_of_free_groups_only_keeps_the_others():
    # A refit after adding sources (the residual pass): only the groups holding a free source
    # iterate; the others keep their start values exactly and still count in the residual.
    img, w, x, y, flux = _field(11)
    first = fit_point_sources(img, w, x0=x, y0=y, flux0=flux, fwhm_px=2.6)
    n_grid = x.size - 5
    free = np.zeros(x.size, dtype=bool)
    free[n_grid] = True  # one member of the close pair: the whole pair is refitted
    start_x = first.x + 0.2
    refit = fit_point_sources(img, w, x0=start_x, y0=first.y, flux0=first.flux, fwhm_px=2.6,
                              free=free)
    moved = refit.x != start_x
    assert not np.any(moved[:n_grid]) and not np.any(moved[n_grid + 2 :])
    assert np.all(np.abs(refit.x[n_grid : n_grid + 2] - first.x[n_grid : n_grid + 2]) < 0.05)
    # Fixed sources are off by 0.2 px: their residual shows it, the refitted pair's does not.
    assert np.all(np.isfinite(refit.flux_err))
    assert np.all(refit.chi2[:n_grid] > first.chi2[:n_grid])
    assert refit.chi2[n_grid] == pytest.approx(first.chi2[n_grid], rel=0.05)


def test_connected_components_match_scipy():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from services.extract.prf import _connected_components

    rng = np.random.default_rng(2)
    for _ in range(50):
        n, m = int(rng.integers(1, 40)), int(rng.integers(0, 50))
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        _, want = connected_components(coo_matrix((np.ones(m), (i, j)), shape=(n, n)),
                                       directed=False)
        np.testing.assert_array_equal(_connected_components(n, i, j), want)
