"""The compiled PRF fits (`prf_kernels`; the Gaussian and the tabulated PRFs) against the
array code they replace.

The array code (`prf._COMPILED = False`) is the reference: both implement the same
Levenberg-Marquardt fit, so on the same inputs they must agree to rounding, on the hard cases
(blends, stamps cut by the image edge, masked pixels, refits of a subset, a common-FWHM fit
with a blend rejected).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.extract import jit, prf, prf_kernels
from services.extract.photometry import estimate_fwhm_px
from services.extract.prf import fit_common_fwhm, fit_point_sources
from services.extract.prfmodel import obscured_airy_prf

from .synth import render_sources


def _crowded(seed: int, *, fwhm_px: float = 2.7, noise: float = 0.02):
    """80 sources on 120x110 px: pairs and chains, sources on the edges, a masked column, a
    masked block and NaN-free data under zero weight."""
    rng = np.random.default_rng(seed)
    n = 80
    x = rng.uniform(-1.0, 110.0, n)
    y = rng.uniform(-1.0, 120.0, n)
    x[:4] = [0.2, 108.7, 55.0, 56.8]  # on the edges, and a close pair
    y[:4] = [60.0, 3.0, 50.0, 51.1]
    flux = rng.uniform(1.0, 40.0, n)
    img = render_sources((120, 110), x, y, flux, sigma_px=prf.sigma_from_fwhm(fwhm_px),
                         half_size=12)
    img += rng.normal(0.0, noise, img.shape)
    weight = np.full(img.shape, 1.0 / noise**2)
    weight[:, 30] = 0.0
    weight[70:76, 80:86] = 0.0
    start = (x + rng.uniform(-0.5, 0.5, n), y + rng.uniform(-0.5, 0.5, n),
             flux * rng.uniform(0.6, 1.4, n))
    return img, weight, x, y, flux, start


def _both(monkeypatch: pytest.MonkeyPatch, call):
    monkeypatch.setattr(prf, "_COMPILED", True)
    compiled = call()
    monkeypatch.setattr(prf, "_COMPILED", False)
    array = call()
    return compiled, array


def _assert_same_fit(a: prf.PrfFit, b: prf.PrfFit) -> None:
    for name in ("flux", "x", "y", "flux_err", "x_err", "y_err", "chi2", "residual"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-8, atol=1e-10,
                                   err_msg=name)
    for name in ("npix", "group", "n_in_group"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.converged == b.converged


#: A tabulated PRF of about the crowded field's width: an obscured, blurred Airy pattern.
AIRY = obscured_airy_prf(lambda_over_d_px=2.6, obscuration=0.3, blur_fwhm_px=0.5,
                         radius_px=12.0)


@pytest.mark.parametrize("tabulated", [None, AIRY], ids=["gaussian", "airy"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_fit_equals_array_fit(monkeypatch, seed, tabulated):
    img, w, _, _, _, (x0, y0, f0) = _crowded(seed)
    a, b = _both(monkeypatch, lambda: fit_point_sources(img, w, x0=x0, y0=y0, flux0=f0,
                                                         fwhm_px=2.7, prf=tabulated))
    _assert_same_fit(a, b)
    assert a.n_in_group.max() >= 3  # the field has blends


def test_a_fit_without_its_residual_image_is_the_same_fit():
    img, w, _, _, _, (x0, y0, f0) = _crowded(8)
    for tabulated in (None, AIRY):
        full = fit_point_sources(img, w, x0=x0, y0=y0, flux0=f0, fwhm_px=2.7, prf=tabulated)
        bare = fit_point_sources(img, w, x0=x0, y0=y0, flux0=f0, fwhm_px=2.7, prf=tabulated,
                                 with_residual=False)
        assert bare.residual.shape == (0, 0)
        for name in ("flux", "x", "y", "flux_err", "chi2", "npix"):
            np.testing.assert_array_equal(getattr(bare, name), getattr(full, name))


def test_compiled_fit_of_a_crowded_chain_equals_array(monkeypatch):
    # 150 sources on 60x60 px: their stamps chain into blends of tens of sources, solved by
    # LAPACK rather than the small-system loop (prf_kernels._SMALL_SYSTEM).
    rng = np.random.default_rng(9)
    x, y = rng.uniform(0.0, 60.0, 150), rng.uniform(0.0, 60.0, 150)
    flux = rng.uniform(1.0, 20.0, 150)
    img = render_sources((60, 60), x, y, flux, sigma_px=prf.sigma_from_fwhm(2.7), half_size=12)
    img += rng.normal(0.0, 0.02, img.shape)
    w = np.full(img.shape, 2500.0)
    a, b = _both(monkeypatch, lambda: fit_point_sources(
        img, w, x0=x + 0.3, y0=y - 0.2, flux0=flux, fwhm_px=2.7, max_iter=8))
    assert 3 * a.n_in_group.max() > prf_kernels._SMALL_SYSTEM
    _assert_same_fit(a, b)


@pytest.mark.parametrize("tabulated", [None, AIRY], ids=["gaussian", "airy"])
def test_compiled_refit_of_a_subset_equals_array(monkeypatch, tabulated):
    img, w, _, _, _, (x0, y0, f0) = _crowded(4)
    free = np.zeros(x0.size, dtype=bool)
    free[::7] = True
    a, b = _both(monkeypatch, lambda: fit_point_sources(
        img, w, x0=x0, y0=y0, flux0=f0, fwhm_px=2.7, free=free, max_iter=4, half_size=5,
        prf=tabulated))
    _assert_same_fit(a, b)
    # Groups without a free source keep their start values.
    still = ~np.isin(a.group, a.group[free])
    np.testing.assert_array_equal(a.x[still], x0[still])


def test_compiled_fit_recovers_truth_without_noise():
    img, w, x, y, flux, (x0, y0, f0) = _crowded(5, noise=1e-9)
    inside = (x > 3) & (x < 106) & (y > 3) & (y < 116)
    fit = fit_point_sources(img, np.where(w > 0, 1.0, 0.0), x0=x0, y0=y0, flux0=f0,
                            fwhm_px=2.7, half_size=6, max_iter=50, tol_px=1e-7)
    # Sources cut by the image edge or under the masks are less constrained; the rest exact.
    ok = inside & (np.abs(x - 30) > 4) & ~((x > 77) & (x < 89) & (y > 67) & (y < 79))
    np.testing.assert_allclose(fit.flux[ok], flux[ok], rtol=1e-4)
    np.testing.assert_allclose(fit.x[ok], x[ok], atol=1e-4)


def test_compiled_common_fwhm_equals_array_and_truth(monkeypatch):
    rng = np.random.default_rng(6)
    gx, gy = np.meshgrid(np.arange(15, 110, 19.0), np.arange(15, 100, 19.0))
    x = np.concatenate([gx.ravel() + rng.uniform(-0.5, 0.5, gx.size), [60.0]])
    y = np.concatenate([gy.ravel() + rng.uniform(-0.5, 0.5, gy.size), [110.0]])
    flux = rng.uniform(20.0, 60.0, x.size)
    img = render_sources((120, 120), x, y, flux, sigma_px=prf.sigma_from_fwhm(3.1),
                         half_size=14)
    # An unresolved blend: a source 1.2 px from the last one, which a common FWHM must reject.
    img += render_sources((120, 120), np.array([61.2]), np.array([110.0]), np.array([40.0]),
                          sigma_px=prf.sigma_from_fwhm(3.1), half_size=14)
    img += rng.normal(0.0, 0.02, img.shape)
    w = np.full(img.shape, 2500.0)
    a, b = _both(monkeypatch, lambda: fit_common_fwhm(
        img, w, x0=x, y0=y, flux0=flux, fwhm_px=2.6, half_size=8, fwhm_range=(1.0, 6.5),
        reject_factor=5.0))
    assert a == pytest.approx(b, rel=1e-9)
    assert a == pytest.approx(3.1, rel=0.005)
    # The whole measurement (peaks -> isolated sources -> common fit) agrees too.
    a, b = _both(monkeypatch, lambda: estimate_fwhm_px(img, w, guess_px=2.6))
    assert a == pytest.approx(b, rel=1e-9)


def test_read_only_and_big_endian_inputs(monkeypatch):
    img, w, _, _, _, (x0, y0, f0) = _crowded(7)
    ro = img.astype(">f8")
    ro.flags.writeable = False
    w_ro = w.astype(np.float32)  # float32, big-endian weights read from a FITS file
    w_be = w_ro.astype(">f4")
    w_be.flags.writeable = False
    got = fit_point_sources(ro, w_be, x0=x0, y0=y0, flux0=f0, fwhm_px=2.7)
    _assert_same_fit(got, fit_point_sources(img, w_ro.astype(float), x0=x0, y0=y0, flux0=f0,
                                            fwhm_px=2.7))
    # The common FWHM too.
    assert fit_common_fwhm(ro, w_be, x0=x0[:20], y0=y0[:20], flux0=f0[:20], fwhm_px=2.5,
                           half_size=6) == pytest.approx(
        fit_common_fwhm(img, w, x0=x0[:20], y0=y0[:20], flux0=f0[:20], fwhm_px=2.5,
                        half_size=6), rel=1e-6)


def test_kernels_compile_without_a_cache_directory():
    # Code without a source file has no cache location: numba refuses cache=True there, as
    # it does on a read-only file system; the kernel is then compiled for the process.
    namespace: dict[str, object] = {}
    exec(compile("def twice(a):\n    return 2.0 * a\n", "<no file>", "exec"), namespace)
    kernel = jit.kernel(namespace["twice"])
    assert kernel(np.arange(3.0)).tolist() == [0.0, 2.0, 4.0]


def test_compile_kernels_prepares_every_kernel():
    # In a fresh interpreter (nothing compiled yet): after compile_kernels, every entry kernel
    # of the extraction has its machine code, so no extraction compiles.
    code = (
        "from services.extract import background, photometry, prf_kernels\n"
        "from services.extract.jit import compile_kernels\n"
        "entries = [prf_kernels.fit_groups, prf_kernels.fit_common_sigma,\n"
        "           prf_kernels.shared_weighted_pixel,\n"
        "           prf_kernels.tabulated_stamps, prf_kernels.add_wings,\n"
        "           background._clipped_sorted_rows, photometry._aperture_sums]\n"
        "assert not any(k.signatures for k in entries)\n"
        "seconds = compile_kernels()\n"
        "missing = [k.__name__ for k in entries if not k.signatures]\n"
        "assert not missing, missing\n"
        "# one specialisation each: an extraction with either PRF meets compiled code\n"
        "assert all(len(k.signatures) == 1 for k in entries), [k.signatures for k in entries]\n"
        "print(seconds)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0.0
