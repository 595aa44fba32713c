"""ISOCAM science against the simulator's truth: CISP calibration, deglitching, CPSL."""

from __future__ import annotations

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord

from services.calibrate import isocam as cal
from services.extract import isocam as ext
from services.mosaic import isocam as mos
from shared.instruments import isocam as ic

OBS = ("12900907", "12900908")


def _pairs(revolution, obsnum):  # type: ignore[no-untyped-def]
    sel = np.nonzero(revolution.pairs["obsnum"] == obsnum)[0]
    return sel, revolution.pairs["sky_adug_s"][sel]


def test_cisp_rows_and_status(processed) -> None:  # type: ignore[no-untyped-def]
    for obsnum in OBS:
        cisp = processed.spd[obsnum].cisp
        disc = ic.column(cisp, "CISPDISC")
        pos = ic.column(cisp, "RASTPOS")
        assert cisp[0].header["FILENAME"] == f"CISP{obsnum}"
        assert ic.column(cisp, "ARRAY").shape[1] == 1024
        # 9 raster positions x 8 pairs usable, 8 slew pairs flagged MOVING
        assert (disc == 0).sum() == 72 and (disc == int(cal.Disc.MOVING)).sum() == 8
        assert set(pos[disc == 0]) == set(range(1, 10))
        stat = ic.column(cisp, "PIXSTAT").reshape(-1, 32, 32)
        assert (stat[:, :, ic.DEAD_COLUMN] & int(cal.PixStat.DEAD)).all()


def test_cisp_raw_rate_is_eoi_minus_reset(processed, revolution) -> None:  # type: ignore
    cier = processed.cier[OBS[0]]
    arr = ic.column(cier, "ARRAY").astype(float)
    gain, tint = ic.column(cier, "GAIN")[1], ic.column(cier, "TINT")[1]
    rate = ic.column(processed.spd[OBS[0]].cisp, "ARRAY")
    np.testing.assert_allclose(rate[0], (arr[1] - arr[0]) / (gain * tint), rtol=1e-5, atol=1e-4)


def test_calibrated_pairs_match_truth(processed, revolution) -> None:  # type: ignore
    """After dark, deglitch, transient and flat, usable pair rates equal the sky rate (ADU/G/s)
    within the noise: global bias < 0.3% of the background, per-position means within 5
    standard errors for >= 99% of pixels, and the transient (first pair at each position,
    pixels whose sky changed by > 20 ADU/G/s) corrected to a median bias < 2% of the step."""
    for obsnum in OBS:
        spd = processed.spd[obsnum]
        _, truth = _pairs(revolution, obsnum)
        good = spd.good
        diff = spd.rate_adug_s - truth
        bg = ic.FILTERS[spd.cisp[0].header["FILTER"]].background_adug_s
        assert abs(np.median(diff[good])) < 0.003 * bg
        pos = ic.column(spd.cisp, "RASTPOS")
        z_all = []
        for p in range(1, 10):
            rows = pos == p
            g = good[rows]
            n = g.sum(axis=0)
            d = np.where(g, diff[rows], 0.0)
            mean = d.sum(axis=0) / np.maximum(n, 1)
            sd = np.sqrt((np.where(g, (diff[rows] - mean) ** 2, 0.0)).sum(axis=0)
                         / np.maximum(n - 1, 1))
            ok = n >= 4
            z_all.append(np.abs(mean[ok]) / (sd[ok] / np.sqrt(n[ok])))
        z = np.concatenate(z_all)
        assert np.mean(z < 5) >= 0.99
        # transient: rows just after a slew, where the sky changed a lot
        first = np.nonzero((pos[1:] > 0) & (pos[:-1] == 0))[0] + 1
        prev = first - 2  # last pair at the previous position
        step = np.abs(truth[first] - truth[prev]) > 20.0
        sel = step & good[first]
        dstep = np.abs(truth[first] - truth[prev])[sel]
        rel = diff[first][sel] / dstep
        assert rel.size > 20 and abs(np.median(rel)) < 0.02
        # without the correction a lagging fraction of the step is missing
        raw = cal.apply_flat(cal.subtract_dark(ic.column(spd.cisp, "ARRAY")[first]))
        rel_raw = np.abs(raw[sel] - truth[first][sel]) / dstep
        assert np.median(rel_raw) > 0.1


def test_glitches_removed(processed, revolution) -> None:  # type: ignore[no-untyped-def]
    """>= 90% of injected glitch pixel values above 5 sigma (in usable pairs) are flagged; the
    flagged set holds >= 85% of the injected glitch charge; false flags < 0.2% of values."""
    for obsnum in OBS:
        spd = processed.spd[obsnum]
        sel, truth = _pairs(revolution, obsnum)
        g = revolution.glitches
        inj = np.isin(g["pair"], sel)
        row = g["pair"][inj] - sel[0]
        pix = g["pixel"][inj]
        amp = g["adug_s"][inj]
        usable = ic.column(spd.cisp, "CISPDISC")[row] == 0
        h = spd.cisp[0].header
        sigma = cal.deglitch.noise_model(truth[row, pix], gain=h["GAIN"], tint_s=h["TINT"])
        big = (amp > 5 * sigma) & usable
        found = spd.glitch[row, pix]
        assert found[big].mean() >= 0.90
        assert amp[found & usable].sum() / amp[usable].sum() >= 0.85
        injected = np.zeros_like(spd.glitch)
        injected[row, pix] = True
        assert (spd.glitch & ~injected).sum() < 0.002 * spd.glitch.size
        cgll = spd.cgll
        assert cgll[0].header["FILENAME"] == f"CGLL{obsnum}"
        assert len(cgll[1].data) == spd.glitch.sum()


def _match(cpsl, src, max_arcsec):  # type: ignore[no-untyped-def]
    d = cpsl[1].data
    c_det = SkyCoord(np.asarray(d["RA"]) * u.deg, np.asarray(d["DEC"]) * u.deg)
    c_true = SkyCoord(np.asarray(src["ra_deg"]) * u.deg, np.asarray(src["dec_deg"]) * u.deg)
    idx, sep, _ = c_true.match_to_catalog_sky(c_det)
    return idx, sep.arcsec, sep.arcsec < max_arcsec


def test_cpsl_against_truth(processed, revolution) -> None:  # type: ignore[no-untyped-def]
    """Completeness >= 90% above S/N 10, median flux ratio within 5% for S/N > 30, positions
    within 1/3 of the pixel field RMS (over both observations, well-covered area)."""
    snr_all, found_all, ratio_hi, sep_all = [], [], [], []
    for obsnum in OBS:
        maps, cpsl = processed.maps[obsnum], processed.cpsl[obsnum]
        src = revolution.sources[obsnum]
        h = cpsl[0].header
        assert h["FILENAME"] == f"CPSL{obsnum}"
        forced = ext.forced_photometry(maps.cmos, maps.cmap, src["ra_deg"], src["dec_deg"],
                                       noise_scale=h["NOISESCL"])
        img, w = mos.cmap_image(maps.cmos, 2)
        x, y = w.wcs_world2pix(src["ra_deg"], src["dec_deg"], 0)
        inside = (x >= 0) & (x < img.shape[1]) & (y >= 0) & (y < img.shape[0])
        expo = np.where(inside, img[np.clip(np.rint(y).astype(int), 0, img.shape[0] - 1),
                                    np.clip(np.rint(x).astype(int), 0, img.shape[1] - 1)], 0)
        covered = inside & (expo >= 0.3 * img.max())
        snr_true = np.asarray(src["flux_jy"]) / forced.flux_err_jy
        lens = h["LENS"]
        idx, sep, ok = _match(cpsl, src, lens / 2.0)
        d = cpsl[1].data
        snr_all.append(snr_true[covered])
        found_all.append(ok[covered])
        hi = covered & ok & (snr_true > 30)
        ratio_hi.append(np.asarray(d["FLUX"])[idx[hi]] / np.asarray(src["flux_jy"])[hi])
        sep_all.append(sep[covered & ok])
        # MAPINDEX points at a FLUX row of the CMAP
        types = np.char.strip(maps.cmap[1].data["TYPE"].astype(str))
        assert (types[np.asarray(d["MAPINDEX"]) - 1] == "FLUX").all()
    snr, found = np.concatenate(snr_all), np.concatenate(found_all)
    bright = snr > 10
    assert bright.sum() >= 15
    assert found[bright].mean() >= 0.90
    ratio = np.concatenate(ratio_hi)
    assert ratio.size >= 8
    assert abs(np.median(ratio) - 1.0) < 0.05
    rms = np.sqrt(np.mean(np.concatenate(sep_all) ** 2))
    assert rms < 6.0 / 3.0


def test_cmap_cmos_conventions(processed) -> None:  # type: ignore[no-untyped-def]
    maps = processed.maps[OBS[0]]
    cmap = maps.cmap[1].data
    assert list(np.char.strip(cmap["TYPE"][:3].astype(str))) == ["FLUX", "FLUX_ERR", "EXPOSURE"]
    for col in ("ARRAY", "TYPE", "BUNIT", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CDELT1",
                "CDELT2", "CTYPE1", "CTYPE2", "CROTA2", "OBSINDEX"):
        assert col in maps.cmap[1].columns.names
    assert cmap["ARRAY"].shape[1] == 1024
    assert str(cmap["BUNIT"][0]).strip() == "Jy/pixel"
    cmos = maps.cmos[1].data
    assert len(cmos) == 3 and "MAPINDEX" in maps.cmos[1].columns.names
    np.testing.assert_array_equal(cmos["MAPINDEX"][0], np.arange(1, 28, 3))
    img, _ = mos.cmap_image(maps.cmos, 0)
    expo, _ = mos.cmap_image(maps.cmos, 2)
    assert np.isfinite(img[expo > 0]).all() and (expo > 0).mean() > 0.4
