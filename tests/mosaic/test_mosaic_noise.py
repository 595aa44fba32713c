"""The mosaic's noise model against measured noise: `munc` per pixel, NCORFAC for point sources.

The frames are the synthetic MIPS-24 geometry (`mosaic_synth`) with pure Gaussian noise as data
(sky 0, so the noiseless mosaic is 0): every departure of the mosaic from 0 is propagated noise.
"""

from __future__ import annotations

import math

import mosaic_synth
import numpy as np
import pytest
from scipy.special import erf

from services.mosaic import Mosaic, build_mosaic, mosaic_hdus
from services.mosaic.noisecorr import large_aperture_noise_factor, point_source_noise_factor
from shared.bcd import BCDFrame
from shared.instruments import mips


def _noise_frames(seed: int, *, n_frames: int = 24) -> list[BCDFrame]:
    """The synthetic frames' geometry, unc and masks with data = unc x N(0, 1) (no sky)."""
    frames, _truth = mosaic_synth.make_frames(
        n_frames, seed=3, sources=[], n_cosmic=0, offsets_sigma=0.0
    )
    rng = np.random.default_rng(seed)
    out = []
    for f in frames:
        # unc varies by +-30% across each frame, so the propagation is exercised unevenly
        yy = np.arange(f.data.shape[0])[:, None] / f.data.shape[0]
        unc = (f.unc * (0.7 + 0.6 * yy) * np.ones_like(f.unc)).astype(np.float32)
        data = (rng.standard_normal(f.data.shape) * unc).astype(np.float32)
        out.append(BCDFrame(data, unc, f.mask, f.header, f.key))
    return out


def _mosaics(pixel_arcsec: float, *, n: int = 3, pixfrac: float = 1.0) -> list[Mosaic]:
    return [
        build_mosaic(
            _noise_frames(100 + s),
            pixel_arcsec=pixel_arcsec,
            match_background=False,
            outlier_sigma=None,
            pixfrac=pixfrac,
        )
        for s in range(n)
    ]


def _psf_flux_z(m: Mosaic, *, fwhm_px: float, n: int, seed: int) -> np.ndarray:
    """Optimal PSF-weighted fluxes at random positions over their munc-predicted sigma."""
    sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = math.ceil(2.0 * fwhm_px)
    ny, nx = m.image.shape
    rng = np.random.default_rng(seed)
    x = rng.uniform(half + 1, nx - half - 2, 4 * n)
    y = rng.uniform(half + 1, ny - half - 2, 4 * n)
    off = np.arange(-half, half + 1)
    px = np.round(x).astype(int)[:, None] + off
    py = np.round(y).astype(int)[:, None] + off
    s = math.sqrt(2.0) * sigma
    gx = 0.5 * (erf((px - x[:, None] + 0.5) / s) - erf((px - x[:, None] - 0.5) / s))
    gy = 0.5 * (erf((py - y[:, None] + 0.5) / s) - erf((py - y[:, None] - 0.5) / s))
    p = gy[:, :, None] * gx[:, None, :]
    d = m.image[py[:, :, None], px[:, None, :]].astype(float)
    u = m.unc[py[:, :, None], px[:, None, :]].astype(float)
    cov = m.coverage[py[:, :, None], px[:, None, :]]
    full = np.all(np.isfinite(d) & (cov >= 3), axis=(1, 2))  # whole stamp well covered
    d, u, p = d[full][:n], u[full][:n], p[full][:n]
    w = 1.0 / u**2
    spp = np.sum(w * p * p, axis=(1, 2))
    flux = np.sum(w * p * d, axis=(1, 2)) / spp
    return flux * np.sqrt(spp)


@pytest.mark.parametrize("pixel_arcsec", [2.45, 1.0])
def test_munc_matches_measured_pixel_noise_at_every_coverage(pixel_arcsec: float) -> None:
    """std(maic / munc) on pure-noise frames is 1 within 5% in every coverage bin (1..24
    frames), at the 24 um default grid (2.45") and on a fine grid (1", input pixels spanning
    up to 4 output pixels)."""
    ms = _mosaics(pixel_arcsec)
    z = np.concatenate([(m.image / m.unc).ravel() for m in ms])
    cov = np.concatenate([m.coverage.ravel() for m in ms])
    ok = np.isfinite(z)
    for lo, hi in ((1, 3), (3, 6), (6, 10), (10, 15), (15, 25)):
        sel = ok & (cov >= lo) & (cov < hi)
        if sel.sum() < 2000:
            continue
        std = float(np.std(z[sel]))
        print(f'pixel {pixel_arcsec}" coverage {lo}-{hi}: n={sel.sum()} std(maic/munc)={std:.3f}')
        assert abs(std - 1.0) < 0.05, (lo, hi, std)


def test_coverage_counts_whole_footprints_on_a_fine_grid() -> None:
    """Coverage x pixel area sums to the frames' valid area also when an input pixel spans more
    than 2 output pixels (no truncated kernel), within 0.5%."""
    frames = _noise_frames(7, n_frames=6)
    m = build_mosaic(frames, pixel_arcsec=1.0, match_background=False, outlier_sigma=None)
    valid_px = sum(int(((f.mask & mips.FATAL_BITS) == 0).sum()) for f in frames if f.dcenum != 0)
    expected = valid_px * mips.BANDS[1].pixel_arcsec ** 2 / m.pixel_arcsec**2
    got = float(np.nansum(m.coverage))
    assert abs(got / expected - 1.0) < 0.005, (got, expected)


@pytest.mark.parametrize(("pixel_arcsec", "pixfrac"), [(2.45, 1.0), (1.0, 1.0), (2.45, 0.6)])
def test_ncorfac_matches_measured_point_source_noise(pixel_arcsec: float, pixfrac: float) -> None:
    """The scatter of optimal PSF-weighted fluxes (24 um FWHM) at random positions of pure-noise
    mosaics, over the munc prediction for independent pixels, equals `noise_corr_psf` within 8%
    (the scatter of ~1800 partly overlapping stamps is known to ~3%); without the factor the
    prediction would be off by 40% (2.45") to 150% (1")."""
    ms = _mosaics(pixel_arcsec, pixfrac=pixfrac)
    fwhm_px = mips.BANDS[1].psf_fwhm_arcsec / pixel_arcsec
    z = np.concatenate([_psf_flux_z(m, fwhm_px=fwhm_px, n=600, seed=i) for i, m in enumerate(ms)])
    measured = float(np.std(z))
    factor = ms[0].noise_corr_psf
    print(f'pixel {pixel_arcsec}" pixfrac {pixfrac}: measured {measured:.3f} NCORFAC {factor:.3f}')
    assert z.size >= 1500
    assert abs(measured / factor - 1.0) < 0.08, (measured, factor)


def test_ncorfac_written_to_maic_and_munc() -> None:
    """NCORFAC and NCORLRG are in the maic and munc headers (not mcov), equal to the Mosaic's."""
    m = _mosaics(2.45, n=1)[0]
    hdus = mosaic_hdus(m, template_header=_noise_frames(0)[0].header, creator="test")
    for kind in ("maic", "munc"):
        h = hdus[kind][0].header
        assert h["NCORFAC"] == pytest.approx(m.noise_corr_psf, abs=1e-4)
        assert h["NCORLRG"] == pytest.approx(m.noise_corr_large, abs=1e-4)
        assert 1.2 < h["NCORFAC"] < h["NCORLRG"]
    assert "NCORFAC" not in hdus["mcov"][0].header


def test_noise_factors_limits() -> None:
    """Input pixels much smaller than the output pixels and the PSF: no correlation (1);
    the factor grows with the input pixel and with the PSF towards the large-aperture one."""
    assert point_source_noise_factor(input_pixel_px=1e-3, psf_fwhm_px=3.0) == pytest.approx(1.0)
    small = point_source_noise_factor(input_pixel_px=2.5, psf_fwhm_px=2.0)
    big = point_source_noise_factor(input_pixel_px=2.5, psf_fwhm_px=20.0)
    assert 1.0 < small < big < large_aperture_noise_factor(input_pixel_px=2.5)
    assert big == pytest.approx(large_aperture_noise_factor(input_pixel_px=2.5), rel=0.02)
    with pytest.raises(ValueError):
        point_source_noise_factor(input_pixel_px=0.0, psf_fwhm_px=2.0)
