"""Forced upper limits on BCDs and band-merging, against injected truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.extract import UpperLimitError, bandmerge, extract_sources, forced_upper_limits
from services.extract.prf import sigma_from_fwhm
from shared.instruments import mips

from .synth import make_bcd_frames, make_mosaic

RA0, DEC0 = 150.0, 2.0


def _grid(n_side: int, step_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    k = (np.arange(n_side) - (n_side - 1) / 2) * step_arcsec / 3600.0
    dd, rr = np.meshgrid(k, k)
    return RA0 + rr.ravel() / math.cos(math.radians(DEC0)), DEC0 + dd.ravel()


def _ps_noise_ujy(channel: int, unc_mjysr: float) -> float:
    """1-sigma noise of an optimal PSF fit on one frame (white noise, no sky fit)."""
    band = mips.BANDS[channel]
    s = sigma_from_fwhm(band.psf_fwhm_arcsec / band.pixel_arcsec)
    pix_ujy = unc_mjysr * 1e12 * mips.SR_PER_ARCSEC2 * band.pixel_arcsec**2
    return pix_ujy * math.sqrt(4 * math.pi * (s**2 + 1 / 12))


def test_upper_limits_70um():
    ra, dec = _grid(5, 40.0)  # 40" apart: > 2 FWHM at 70 um
    unc = 0.5
    one = _ps_noise_ujy(2, unc)
    rng = np.random.default_rng(3)
    # Faint sources, 0..2 sigma of a 30-frame stack: the undetected population.
    flux = rng.uniform(0.0, 2.0, ra.size) * one / math.sqrt(30)
    frames = make_bcd_frames(ra, dec, flux, channel=2, ra0=RA0, dec0=DEC0, n_frames=30,
                             dither_arcsec=40.0, unc_mjysr=unc, seed=4)
    t = forced_upper_limits(ra, dec, frames, fwhm_arcsec=18.0, nsigma=3.0,
                            fatal_bits=mips.FATAL_BITS)
    assert "max(flux, 0) + nsigma" in t.meta["ULCONV"]
    ok = np.asarray(t["n_frames"]) > 0
    assert ok.sum() >= 20
    assert np.mean(flux[ok] < np.asarray(t["ulim"])[ok]) >= 0.95
    expect = 3.0 * one / np.sqrt(np.asarray(t["n_frames"])[ok])
    ratio = np.asarray(t["ulim"])[ok] / expect
    assert 0.5 <= np.median(ratio) <= 2.0
    # The forced fluxes themselves are unbiased (pull mean ~0, width ~1).
    pull = (np.asarray(t["flux"])[ok] - flux[ok]) / np.asarray(t["delta_flux"])[ok]
    assert abs(np.mean(pull)) < 0.6
    assert 0.6 < np.std(pull) < 1.5
    # A position far off every frame has no data.
    far = forced_upper_limits([RA0 + 1.0], [DEC0], frames, fwhm_arcsec=18.0)
    assert far["n_frames"][0] == 0 and np.isnan(far["ulim"][0])


def test_upper_limit_of_a_bright_source_brackets_its_flux():
    ra, dec = _grid(2, 60.0)
    flux = np.array([5e4, 0.0, 2e4, 0.0])
    frames = make_bcd_frames(ra, dec, flux, channel=1, ra0=RA0, dec0=DEC0, n_frames=12,
                             dither_arcsec=30.0, unc_mjysr=0.05, seed=8)
    t = forced_upper_limits(ra, dec, frames, fwhm_arcsec=5.9)
    got = np.asarray(t["flux"])
    assert got[0] == pytest.approx(5e4, rel=0.03)
    assert got[2] == pytest.approx(2e4, rel=0.03)
    assert np.all(np.asarray(t["ulim"]) > flux)


def test_upper_limit_inputs_checked():
    with pytest.raises(UpperLimitError, match="fwhm"):
        forced_upper_limits([1.0], [2.0], [], fwhm_arcsec=0.0)
    with pytest.raises(UpperLimitError, match="1-D"):
        forced_upper_limits([1.0, 2.0], [2.0], [], fwhm_arcsec=5.0)


def test_bandmerge_24_70_with_upper_limits():
    ra, dec = _grid(6, 45.0)
    n = ra.size
    rng = np.random.default_rng(12)
    f24 = rng.uniform(2000.0, 8000.0, n)  # all well detected at 24 um
    # Every other source is bright at 70 um; the rest are absent there (upper limits).
    bright70 = (np.arange(n) % 2) == 0
    f70 = np.where(bright70, rng.uniform(3e5, 6e5, n), 0.0)
    m24 = make_mosaic(shape=(150, 150), pixel_arcsec=2.45, fwhm_arcsec=5.9,
                      truth_radec=(ra, dec, f24), sigma1_mjysr=0.03, seed=13, channel=1,
                      ra0=RA0, dec0=DEC0)
    m70 = make_mosaic(shape=(95, 95), pixel_arcsec=4.0, fwhm_arcsec=18.0,
                      truth_radec=(ra, dec, f70), sigma1_mjysr=0.5, seed=14, channel=2,
                      ra0=RA0, dec0=DEC0)
    t24 = extract_sources(m24.image, m24.unc, m24.coverage, m24.header, fwhm_arcsec=None,
                          band_name="24um")
    t70 = extract_sources(m70.image, m70.unc, m70.coverage, m70.header, fwhm_arcsec=None,
                          band_name="70um")
    frames70 = make_bcd_frames(ra, dec, f70, channel=2, ra0=RA0, dec0=DEC0, n_frames=40,
                               dither_arcsec=80.0, unc_mjysr=0.5, seed=15)
    out = bandmerge({"24um": t24, "70um": t70}, frames_by_band={"70um": frames70})
    for col in ("IDNum", "RA", "Dec", "Delta_RA", "Delta_Dec", "CnfFlag", "flux_24um",
                "delta_flux_24um", "snr_24um", "flag_24um", "flux_70um", "flag_70um",
                "ulim_70um"):
        assert col in out.colnames
    assert all(len(c) == 1 for c in out["CnfFlag"])

    # Each merged row is attached to the nearest truth source; check pairs and flags.
    cosd = math.cos(math.radians(DEC0))
    d = np.hypot((np.asarray(out["RA"])[:, None] - ra[None, :]) * cosd,
                 np.asarray(out["Dec"])[:, None] - dec[None, :]) * 3600.0
    truth_of_row = np.argmin(d, axis=1)
    assert np.all(np.min(d, axis=1) < 2.0)
    # Every truth source appears exactly once (no split, no false merge).
    assert sorted(truth_of_row) == list(range(n))
    flags70 = np.asarray(out["flag_70um"])
    assert np.all(flags70[bright70[truth_of_row]] == "D")
    faint_rows = ~bright70[truth_of_row]
    assert np.all(np.isin(flags70[faint_rows], ["U", "N"]))
    assert np.mean(flags70[faint_rows] == "U") >= 0.8
    # Upper limits exceed the (zero) true 70 um flux and are far below the bright sources.
    ul = np.asarray(out["ulim_70um"])[flags70 == "U"]
    assert np.all(ul > 0) and np.all(ul < 0.1 * f70[bright70].min())
    # Matched 70 um fluxes belong to the right 24 um source.
    det = flags70 == "D"
    assert np.allclose(np.asarray(out["flux_70um"])[det], f70[truth_of_row[det]], rtol=0.05)
    assert np.allclose(np.asarray(out["flux_24um"]), f24[truth_of_row], rtol=0.05)
