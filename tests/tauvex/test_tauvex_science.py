"""Calibration, imaging and extraction against the simulated truth."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits

from services.calibrate import tauvex as cal
from services.calibrate.tauvex.calc_ra import galactic
from services.extract import tauvex as ext
from shared.instruments import tauvex as tv

SEED_COLUMNS = {
    "1a": ["W", "S", "Z", "VALIDITY"],
    "1b": ["W", "S", "Z", "VALIDITY", "X", "Y"],
    "1c": ["W", "S", "Z", "VALIDITY", "X", "Y", "CALIB"],
    "1d": ["W", "S", "Z", "VALIDITY", "X", "Y", "CALIB"],
    "1e": ["W", "S", "Z", "VALIDITY", "X", "Y", "CALIB", "GEOCORRX", "GEOCORRY"],
    "1f": ["W", "S", "Z", "VALIDITY", "X", "Y", "CALIB", "GEOCORRX", "GEOCORRY", "RA", "DEC",
           "GLON", "GLAT"],
}
SEED_COLUMNS["1g"] = SEED_COLUMNS["1f"]
MODULE_KEYS = {"1a": ["CRT_LV1A", "VALIDATE"], "1b": ["CALC_XY"], "1c": ["GET_CAL", "APPL_CAL"],
               "1d": ["FLAT_FLD"], "1e": ["GEO_CORR"], "1f": ["CALC_RA"], "1g": ["REGISTER"]}


def test_levels_columns_and_headers(processed) -> None:  # type: ignore[no-untyped-def]
    keys: list[str] = []
    for level in cal.chain.LEVELS:
        keys += MODULE_KEYS[level]
        hdul = processed.chain[2][level]
        assert hdul[0].header.get("NAXIS", 0) == 0
        h = hdul["EVENTS"].header
        assert hdul["EVENTS"].columns.names == [*SEED_COLUMNS[level], "TIME"]
        for k in ("TELESCOP", "TELE_NUM", "FILTER", "STARTOBS", "ENDOBS", "NFRAMES", "NCOUNTS",
                  *keys):
            assert k in h, (level, k)
        assert h["TELE_NUM"] == 2 and h["FILTER"] == "SF2" and h["DATALEVL"] == level


def _centroid_err(c: dict, e: dict, sel: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-source error (arcsec) of the mean event position, sources with >= 200 events."""
    src = e["source_id"][sel][v]
    on_src = src >= 0
    cosd = np.cos(np.radians(e["dec_deg"][sel][v]))
    de = (c["RA"][v] - e["ra_deg"][sel][v]) * cosd * 3600
    dn = (c["DEC"][v] - e["dec_deg"][sel][v]) * 3600
    n = np.bincount(src[on_src])
    me = np.bincount(src[on_src], de[on_src]) / np.maximum(n, 1)
    mn = np.bincount(src[on_src], dn[on_src]) / np.maximum(n, 1)
    return np.hypot(me, mn)[n >= 200]


def test_geometry_and_registration_vs_truth(processed) -> None:  # type: ignore
    e = processed.sim.events
    limit = tv.PSF_FWHM_ARCSEC / 3.0
    for k in (1, 2, 3):
        sel = e["tele"] == k
        c1e, _ = tv.event_columns(processed.chain[k]["1e"])
        c1f, _ = tv.event_columns(processed.chain[k]["1f"])
        c1g, _ = tv.event_columns(processed.chain[k]["1g"])
        v = c1g["VALIDITY"] == 0
        # GEO_CORR: undistorted positions scatter around the true focal-plane position only by
        # the charge noise (no bias), i.e. < 0.05 px median offset.
        dx = c1e["GEOCORRX"][v] - e["x_focal_px"][sel][v]
        assert abs(np.median(dx)) < 0.05 and np.std(dx) < 1.5

        rms_1f = np.sqrt(np.mean(_centroid_err(c1f, e, sel, v) ** 2))
        rms_1g = np.sqrt(np.mean(_centroid_err(c1g, e, sel, v) ** 2))
        assert rms_1f > limit  # the reported attitude is off by ~8": registration is needed
        assert rms_1g < limit / 3, (k, rms_1g)
        # Per event (every photon vs where it came from): only the charge-noise part of the
        # PSF is left, ~ 0.42 FWHM per axis would be the full PSF.
        de = (c1g["RA"][v] - e["ra_deg"][sel][v]) * np.cos(np.radians(e["dec_deg"][sel][v]))
        assert np.sqrt(np.mean((de * 3600) ** 2)) < 0.42 * tv.PSF_FWHM_ARCSEC


def test_galactic_matches_astropy() -> None:
    ra, dec = np.array([0.0, 150.0, 266.4]), np.array([0.0, -30.0, -28.9])
    glon, glat = galactic(ra, dec)
    ref = SkyCoord(ra, dec, unit="deg").galactic
    np.testing.assert_allclose(glon, ref.l.deg, atol=1e-6)
    np.testing.assert_allclose(glat, ref.b.deg, atol=1e-6)


def test_flat_field_weights(processed) -> None:  # type: ignore[no-untyped-def]
    c, _ = tv.event_columns(processed.chain[1]["1d"])
    v = c["VALIDITY"] == 0
    np.testing.assert_allclose(c["CALIB"][v] * tv.flat_field(c["X"][v], c["Y"][v]), 1.0,
                               rtol=1e-5)
    assert (c["CALIB"][~v] == 0).all()


def test_source_recovery_vs_truth(processed) -> None:  # type: ignore[no-untyped-def]
    src = processed.sim.sources
    truth = SkyCoord(src["ra_deg"], src["dec_deg"], unit="deg")
    for k in (1, 2, 3):
        tab = processed.lists[k]
        exp_counts = np.asarray(src[f"exp_counts_t{k}"])
        snr_true = exp_counts / np.sqrt(exp_counts + 1e-9)  # background is ~0.01 count/pixel
        idx, d, _ = truth.match_to_catalog_sky(SkyCoord(tab["RA"], tab["DEC"], unit="deg"))
        found = d.arcsec < tv.PSF_FWHM_ARCSEC / 2
        hi = snr_true > 10
        assert hi.sum() >= 15
        assert found[hi].mean() >= 0.9, (k, found[hi].mean())
        b = found & (snr_true > 30)
        ratio = np.asarray(tab["FLUX_UJY"])[idx[b]] / np.asarray(src[f"flux_ujy_t{k}"])[b]
        assert abs(np.median(ratio) - 1.0) < 0.05, (k, ratio)
        # Purity: detections with S/N > 10 are real sources.
        _, dd, _ = SkyCoord(tab["RA"], tab["DEC"], unit="deg").match_to_catalog_sky(truth)
        strong = np.asarray(tab["SNR"]) > 10
        assert (dd.arcsec[strong] < tv.PSF_FWHM_ARCSEC).mean() > 0.95


def test_band_merge_upper_limits(processed) -> None:  # type: ignore[no-untyped-def]
    images = {f"SF{k}": processed.level2[k].hdul for k in (1, 2, 3)}
    lists = {f"SF{k}": processed.lists[k] for k in (1, 2, 3)}
    bm = ext.band_merge(images, lists)
    assert len(bm) >= max(len(t) for t in lists.values())
    for f in images:
        det = bm[f"DET_{f}"] == 1
        assert np.isnan(bm[f"ULIM_UJY_{f}"][det]).all()
        ul = np.asarray(bm[f"ULIM_UJY_{f}"][~det])
        assert (ul[np.isfinite(ul)] > 0).all()
    # A source ~100x fainter in one filter: detected in the others, limit in that one.
    src = processed.sim.sources
    truth = SkyCoord(src["ra_deg"], src["dec_deg"], unit="deg")
    idx, d, _ = SkyCoord(bm["RA"], bm["DEC"], unit="deg").match_to_catalog_sky(truth)
    n_limits = 0
    for k in (1, 2, 3):
        f = f"SF{k}"
        # Too faint to detect: fewer than 4 photons expected during the scan.
        faint = (np.asarray(src[f"exp_counts_t{k}"])[idx] < 4) & (d.arcsec < 5)
        faint &= bm[f"FLAGS_{f}"] == 0
        n_limits += int(faint.sum())
        assert (bm[f"DET_{f}"][faint] == 0).all()
        assert (bm[f"ULIM_UJY_{f}"][faint] >= np.asarray(src[f"flux_ujy_t{k}"])[idx][faint]).all()
    assert n_limits >= 1
    text = ext.table_to_ipac(bm)
    assert text.startswith("\\") and "|" in text and "ULIM_UJY_SF1" in text


def test_level2_image(processed) -> None:  # type: ignore[no-untyped-def]
    l2 = processed.level2[1]
    h = l2.hdul[0].header
    assert h["BUNIT"] == "uJy/pixel" and h["CTYPE1"] == "RA---TAN" and h["CRT_IMG"]
    assert l2.png.startswith(b"\x89PNG")
    exposure = l2.hdul["EXPOSURE"].data
    cfg = processed.sim.config
    assert abs(exposure.max() - cfg.duration_s) < 0.5
    # Total flux / conversion x exposure recovers the counts (flux calibration is consistent).
    cnt = l2.hdul["COUNTS"].data
    assert cnt.sum() == h["NCOUNTS"]


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="fitsverify not installed")
def test_products_pass_fitsverify(processed, tmp_path: Path) -> None:  # type: ignore
    products = {f"l1{lvl[1]}.fits": processed.chain[3][lvl] for lvl in ("1a", "1c", "1g")}
    products["l2.fits"] = processed.level2[3].hdul
    products["src.fits"] = ext.table_to_fits(processed.lists[3])
    images = {f"SF{k}": processed.level2[k].hdul for k in (1, 2, 3)}
    products["bm.fits"] = ext.table_to_fits(
        ext.band_merge(images, {f"SF{k}": processed.lists[k] for k in (1, 2, 3)}))
    obs = processed.level1.observations[0]
    paths = []
    for name, hdul in products.items():
        p = tmp_path / name
        hdul.writeto(p, checksum=True)
        paths.append(p)
    p = tmp_path / "level1.fits"
    p.write_bytes(obs.to_bytes())
    paths.append(p)
    for p in paths:
        res = subprocess.run(["fitsverify", "-q", "-e", str(p)], capture_output=True, text=True)
        assert "verification OK" in res.stdout, (p.name, res.stdout, res.stderr)
    with fits.open(io.BytesIO(obs.to_bytes())) as hdul:
        assert hdul["FRAMES"].data["FRAME"].shape[1] == tv.FRAME_BYTES


def test_chain_keep_levels(processed) -> None:  # type: ignore[no-untyped-def]
    obs = processed.level1.observations[0]
    out = cal.run_chain(processed.level1a[1], obs.attitude)
    assert set(out) == {"1a", "1g"}
    assert out["1g"]["EVENTS"].header["REGREF"] == "self"
    with pytest.raises(ValueError, match="unknown levels"):
        cal.run_chain(processed.level1a[1], obs.attitude, keep_levels=("1z",))
