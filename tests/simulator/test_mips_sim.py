"""The MIPS AOR simulator: pointing plan, detector forward model, calibration files, truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from shared.instruments import mips
from simulator import sky as skymod
from simulator.mips import MipsAORConfig, SimulatedAOR, pointing_plan, simulate_aor, write_aor


def _cal(sim: SimulatedAOR, channel: int, caltype: str) -> fits.HDUList:
    (hdul,) = [
        h for h in sim.calibration
        if h[0].header["CHNLNUM"] == channel and h[0].header["CALTYPE"] == caltype
    ]  # fmt: skip
    return hdul


def _raw(sim: SimulatedAOR, channel: int, expid: int, dcenum: int) -> fits.HDUList:
    (hdul,) = [
        h for h in sim.raw_dces
        if (h[0].header["CHNLNUM"], h[0].header["EXPID"], h[0].header["DCENUM"])
        == (channel, expid, dcenum)
    ]  # fmt: skip
    return hdul


def test_small_aor_structure(small_aor: SimulatedAOR) -> None:
    tp = small_aor.truth_pointing
    assert len(small_aor.raw_dces) == len(tp)
    for ch in (1, 2):
        rows = tp[tp["channel"] == ch]
        heads = [h[0].header for h in small_aor.raw_dces if h[0].header["CHNLNUM"] == ch]
        assert {h["NDCEGRP"] for h in heads} == {len(rows)}
    # Ge: stim flashes at the start, ~ every stim period and at the end; none at 24 um
    stims = tp[tp["is_stim"]]
    assert set(stims["channel"]) == {2} and len(stims) >= 2
    t70 = tp[tp["channel"] == 2]
    assert bool(t70["is_stim"][-1]) and bool(t70["is_stim"][1])
    heads70 = [h[0].header for h in small_aor.raw_dces if h[0].header["CHNLNUM"] == 2]
    assert [h["STIMFLSH"] for h in heads70] == list(t70["is_stim"])
    # DCEs come in time order
    assert np.all(np.diff(tp["mjd"]) >= 0)
    shapes = {h[0].header["CHNLNUM"]: h[0].data.shape for h in small_aor.raw_dces}
    n70 = heads70[0]["NSAMPLES"]
    assert shapes == {1: (2, 128, 128), 2: (n70, 32, 32)}
    assert n70 == round(heads70[0]["EXPTIME"] * mips.GE_SAMPLE_RATE_HZ)


def test_si_forward_model_first_dce_effect(small_aor: SimulatedAOR) -> None:
    """rate = sky / FLUXCONV * flat * f_dce + dark, recovered from the slope plane to 1%."""
    cfg = small_aor.config
    dark = _cal(small_aor, 1, "DARK")[0].data
    flat = _cal(small_aor, 1, "FLAT")[0].data
    good = _cal(small_aor, 1, "PMASK")[0].data == 0
    expected_f = {0: 1 - cfg.first_dce_depression, 1: 1 - cfg.early_dce_depression, 3: 1.0}
    for dcenum, f_dce in expected_f.items():
        raw = _raw(small_aor, 1, 0, dcenum)
        h = raw[0].header
        rate = raw[0].data[0] / h["SLPSCALE"] / mips.SI_SAMPLE_S
        model = small_aor.truth_bcd(1, 0, dcenum) / mips.BANDS[1].fluxconv * flat
        ratio = np.median(((rate - dark) / model)[good])
        assert ratio == pytest.approx(f_dce, abs=0.01)
        # first difference = one sample's worth of charge
        diff_rate = raw[0].data[1] / mips.SI_SAMPLE_S
        assert np.median((diff_rate - rate)[good]) == pytest.approx(0.0, abs=0.02 * np.median(rate))


def test_ge_forward_model_responsivity_and_stim(small_aor: SimulatedAOR) -> None:
    """rate = (sky / FLUXCONV + stim) * R(t) * flat + dark on the good half, to 1%."""
    tp = small_aor.truth_pointing
    dark = _cal(small_aor, 2, "DARK")[0].data
    flat = _cal(small_aor, 2, "FLAT")[0].data
    pmask = _cal(small_aor, 2, "PMASK")[0].data
    stimlvl = _cal(small_aor, 2, "STIM")[0].header["STIMLVL"]
    assert (pmask[16:] & mips.GE_PMASK_BAD_HALF).all() and not (
        pmask[:16] & mips.GE_PMASK_BAD_HALF
    ).any()
    good = pmask == 0
    for row in tp[tp["channel"] == 2]:
        raw = _raw(small_aor, 2, int(row["expid"]), int(row["dcenum"]))
        cube = raw[0].data.astype(float)
        # median sample-to-sample step: robust to cosmic-ray jumps
        rate = np.median(np.diff(cube, axis=0), axis=0) * mips.GE_SAMPLE_RATE_HZ
        stim = stimlvl if row["is_stim"] else 0.0
        truth = small_aor.truth_bcd(2, int(row["expid"]), int(row["dcenum"]))
        model = (truth / mips.BANDS[2].fluxconv + stim) * flat
        r = np.median(((rate - dark) / model)[good])
        assert r == pytest.approx(row["responsivity"], rel=0.01)


def test_calibration_files(small_aor: SimulatedAOR) -> None:
    kinds = {(h[0].header["CHNLNUM"], h[0].header["CALTYPE"]) for h in small_aor.calibration}
    assert kinds == {
        (1, "DARK"),
        (1, "FLAT"),
        (1, "PMASK"),
        (2, "DARK"),
        (2, "FLAT"),
        (2, "PMASK"),
        (2, "STIM"),
    }
    for h in small_aor.calibration:
        hdr = h[0].header
        assert hdr["TELESCOP"] == "Spitzer" and hdr["INSTRUME"] == "MIPS"
        assert hdr["FILENAME"].startswith(("mips24_", "mips70_"))
        if hdr["CALTYPE"] == "FLAT":
            good = _cal(small_aor, hdr["CHNLNUM"], "PMASK")[0].data == 0
            assert np.median(h[0].data[good]) == pytest.approx(1.0, abs=1e-6)
    pm24 = _cal(small_aor, 1, "PMASK")[0].data
    assert 0 < np.count_nonzero(pm24) < 0.02 * pm24.size
    assert set(np.unique(pm24)) <= {0, int(mips.MaskBit.PMASK)}


def test_truth_bcd_source_flux(small_aor: SimulatedAOR) -> None:
    """Flux of an isolated source in the truth image (background removed) = its truth flux."""
    tp = small_aor.truth_pointing
    row = tp[tp["channel"] == 1][0]
    key = (1, int(row["expid"]), int(row["dcenum"]))
    wcs = small_aor.truth_wcs(*key)
    src = small_aor.truth_sources
    xs, ys = wcs.all_world2pix(src["ra"], src["dec"], 0)
    d = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]) + np.eye(len(src)) * 1e9
    ok = (xs > 12) & (xs < 115) & (ys > 12) & (ys < 115) & (d.min(axis=1) > 14)
    i = int(np.argmax(np.where(ok, src["flux_24_ujy"], -1)))
    assert ok[i]
    no_src = skymod.Sky(
        small_aor.sky.ra0_deg, small_aor.sky.dec0_deg, src[:0], small_aor.sky.background
    )
    bg = skymod.render(no_src, 1, wcs, (128, 128))
    img = small_aor.truth_bcd(*key) - bg
    yy, xx = np.mgrid[0:128, 0:128]
    ap = np.hypot(xx - xs[i], yy - ys[i]) < 6.0  # 15", 6 sigma of the PSF
    area = skymod.pixel_area_arcsec2(wcs, xx[ap], yy[ap])
    flux = float(np.sum(img[ap] * area) * mips.SR_PER_ARCSEC2 * 1e12)
    assert flux == pytest.approx(float(src["flux_24_ujy"][i]), rel=0.005)


def test_default_aor_coverage_and_size() -> None:
    """Default AOR: 60-130 DCEs per channel (stims included), 24 um coverage >= 8 over the
    central 12.7'x12.7' (a square along the array axes, as the AOR lays out its raster), 70 um
    (good half) >= 5."""
    cfg = MipsAORConfig()
    plan = pointing_plan(cfg)
    n24 = int(np.sum(plan["channel"] == 1))
    n70 = int(np.sum(plan["channel"] == 2))
    assert 60 <= n24 <= 130 and 60 <= n70 <= 130
    g = np.linspace(-380.0, 380.0, 41)
    x, y = np.meshgrid(g, g)
    pa = np.radians(cfg.pa_deg)
    xi = -x * np.cos(pa) + y * np.sin(pa)  # array axes -> (east, north), as wcs_keywords
    eta = x * np.sin(pa) + y * np.cos(pa)
    ra, dec = skymod.tangent_to_sky(xi.ravel(), eta.ravel(), cfg.ra_deg, cfg.dec_deg)
    for ch, rows, min_cov in ((1, slice(0, 128), 8), (2, slice(0, 16), 5)):
        cov = np.zeros(ra.size, int)
        for r in plan[(plan["channel"] == ch) & ~plan["is_stim"]]:
            kw = mips.wcs_keywords(ch, ra_deg=r["ra"], dec_deg=r["dec"], pa_deg=r["pa"])
            x, y = WCS(fits.Header(kw)).all_world2pix(ra, dec, 0)
            band = mips.BANDS[ch]
            cov += (
                (x > -0.5) & (x < band.ncols - 0.5) & (y > rows.start - 0.5) & (y < rows.stop - 0.5)
            )
        assert cov.min() >= min_cov, f"channel {ch}"


def test_seeded_and_configurable() -> None:
    cfg = MipsAORConfig.small(channels=(1,), n_dither_24=3, n_sources=5)
    a, b = simulate_aor(cfg), simulate_aor(cfg)
    assert a.telemetry == b.telemetry
    c = simulate_aor(MipsAORConfig.small(channels=(1,), n_dither_24=3, n_sources=5, seed=7))
    assert c.telemetry != a.telemetry
    with pytest.raises(ValueError, match="mode"):
        MipsAORConfig(mode="staring")


def test_scan_map_plan() -> None:
    cfg = MipsAORConfig.scan_map(channels=(1,), scan_legs=2, scan_leg_length_arcsec=180.0)
    plan = pointing_plan(cfg)
    assert set(plan["expid"]) == {0, 1}
    leg = plan[plan["expid"] == 0]
    assert list(leg["dcenum"]) == list(range(len(leg)))
    xi, eta = skymod.tangent_offsets_arcsec(leg["ra"], leg["dec"], cfg.ra_deg, cfg.dec_deg)
    steps = np.hypot(np.diff(xi), np.diff(eta))
    assert steps == pytest.approx(cfg.scan_dce_step_arcsec, rel=1e-3)
    sim = simulate_aor(cfg)
    assert {h[0].header["AOT_TYPE"] for h in sim.raw_dces} == {"MIPSSCAN"}


def test_write_aor(tmp_path: Path) -> None:
    cfg = MipsAORConfig.small(channels=(1,), n_dither_24=2, n_sources=5)
    paths = write_aor(cfg, tmp_path)
    names = {p.name for p in paths}
    assert f"mips_aor_{cfg.aorkey}.tlm" in names
    assert {"mips24_dark.fits", "mips24_flat.fits", "mips24_pmask.fits"} <= names
    assert {"truth_sources.fits", "truth_sources.tbl", "truth_pointing.fits"} <= names
    assert all(p.exists() for p in paths)
    t = Table.read(tmp_path / "truth_sources.tbl", format="ascii.ipac")
    assert len(t) == 5


def test_160um_two_ramps_round_trip() -> None:
    """160 um: 10 s DCEs as two 5 s ramps (the second restarts at the reset level)."""
    from services.decode.mips import decode_dce
    from services.ingest.mips import split_aor_telemetry

    cfg = MipsAORConfig.small(channels=(3,), n_dither_160=2)
    sim = simulate_aor(cfg)
    split = split_aor_telemetry(sim.telemetry)
    assert not split.problems and len(split.chunks) == len(sim.raw_dces)
    raw = decode_dce(split.chunks[0].data)[0]
    assert np.array_equal(raw.data, sim.raw_dces[0][0].data)
    h = raw.header
    assert raw.data.shape == (80, 2, 20) and h["NRAMPS"] == 2 and h["EXPTIME"] == 10.0
    med = np.median(raw.data.reshape(80, -1), axis=1)
    # the reset between the ramps: sample 40 falls back near sample 0
    assert med[39] > med[0] + 100 and abs(med[40] - med[0]) < 0.2 * (med[39] - med[0])


def test_demo_summary_says_which_psf_model_each_list_used(tmp_path, capsys) -> None:
    from astropy.table import Table

    from services.extract.tables import to_ipac_bytes
    from simulator.demo import print_demo_summary

    for name, meta in (("A_sources.tbl", {"PRFMODEL": "obscured Airy", "PRFTEST": 18}),
                       ("B_sources.tbl", {"PRFMODEL": "Gaussian", "PRFTEST": 0})):
        t = Table({"srcid": [1], "flux": [1.0]})
        t.meta.update(meta)
        (tmp_path / name).write_bytes(to_ipac_bytes(t))
    print_demo_summary(tmp_path)
    out = capsys.readouterr().out
    assert "A_sources.tbl: PSF model obscured Airy (chosen on 18 bright sources)" in out
    assert "B_sources.tbl: PSF model Gaussian (too few bright sources to test it)" in out
