"""24 um calibration against injected truth: own forward model and `simulator.mips`."""

from __future__ import annotations

import numpy as np
import pytest
from _mips_calib_forward import simulate_24

from services.calibrate.mips import (
    MipsCalibrateConfig,
    MipsCalibration,
    RawProductError,
    calibrate_mips24_dce,
)
from shared.instruments import mips
from shared.instruments.mips import FATAL_BITS, MaskBit

SAT = int(MaskBit.SATURATED_FROM_DIFF)
CFG = MipsCalibrateConfig(si_read_noise_dn=8.0, si_gain_e_per_dn=5.0)  # the forward model's


def _robust_std(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def test_forward_model_bcd_matches_truth_and_chi() -> None:
    case = simulate_24(1)
    p = calibrate_mips24_dce(case.raw, MipsCalibration.from_hdus(case.calibration), CFG)
    bcd, unc, m = p.bcd[0].data, p.bunc[0].data, p.mask[0].data
    good = ((m & FATAL_BITS) == 0) & ~case.cr_mask
    chi = ((bcd - case.truth_mjysr) / unc)[good]
    assert 0.8 < chi.std() < 1.25
    assert abs(np.median(chi)) < 0.1
    bright = good & (case.truth_mjysr > 50) & ((m & SAT) == 0)
    assert bright.sum() > 20
    assert abs(np.median(bcd[bright] / case.truth_mjysr[bright]) - 1) < 0.005


def test_forward_model_saturated_pixels_recovered_from_difference() -> None:
    case = simulate_24(3, n_saturating=5)
    p = calibrate_mips24_dce(case.raw, MipsCalibration.from_hdus(case.calibration), CFG)
    m = p.mask[0].data
    sat = (m & SAT) != 0
    # every pixel whose ramp clipped is recovered from the difference (dead pixels excepted)
    clipped = case.saturated & ((m & int(MaskBit.PMASK)) == 0)
    assert clipped.sum() >= 10
    assert np.all(sat[clipped])
    ratio = p.bcd[0].data[sat] / case.truth_mjysr[sat]
    assert np.all(np.abs(ratio - 1) < 0.05)
    assert np.all(m[sat] & int(MaskBit.SOFT_SATURATED))


@pytest.mark.parametrize("dcenum", [0, 1, 2])
def test_forward_model_first_and_early_dce_corrected(dcenum: int) -> None:
    case = simulate_24(4, dcenum=dcenum, n_cr=0)
    p = calibrate_mips24_dce(case.raw, MipsCalibration.from_hdus(case.calibration), CFG)
    m = p.mask[0].data
    good = (m & FATAL_BITS) == 0
    ratio = np.median(p.bcd[0].data[good] / case.truth_mjysr[good])
    assert abs(ratio - 1) < 0.01
    bit = MaskBit.FIRST_DCE if dcenum == 0 else MaskBit.EARLY_DCE
    assert np.all(m & int(bit))
    # without the correction the depression shows: the test can fail
    off = MipsCalibrateConfig(
        si_read_noise_dn=8.0, first_dce_depression=0.0, early_dce_depression=0.0
    )
    q = calibrate_mips24_dce(case.raw, MipsCalibration.from_hdus(case.calibration), off)
    assert np.median(q.bcd[0].data[good] / case.truth_mjysr[good]) < 0.99


def test_cosmic_rays_flagged_and_few_false_flags() -> None:
    found = total = false = 0
    npix = 0
    for seed in (11, 12, 13):
        case = simulate_24(seed, n_cr=150)
        p = calibrate_mips24_dce(case.raw, MipsCalibration.from_hdus(case.calibration), CFG)
        m, unc = p.mask[0].data, p.bunc[0].data
        rad = (m & int(MaskBit.RADHIT)) != 0
        strong = case.cr_mask & (case.cr_slope_bias_dn_s * mips.BANDS[1].fluxconv > 5 * unc)
        found += int((rad & strong).sum())
        total += int(strong.sum())
        false += int((rad & ~case.cr_mask).sum())
        npix += rad.size
    assert total > 200
    assert found / total >= 0.90
    assert false / npix < 0.01


def test_sim_bcd_matches_truth(sim_small) -> None:
    cal = MipsCalibration.from_hdus(sim_small.calibration)
    raws = [r for r in sim_small.raw_dces if r[0].header["CHNLNUM"] == 1]
    assert raws
    for raw in raws:
        h = raw[0].header
        p = calibrate_mips24_dce(raw, cal)
        truth = sim_small.truth_bcd(1, h["EXPID"], h["DCENUM"])
        bcd, unc, m = p.bcd[0].data, p.bunc[0].data, p.mask[0].data
        good = (m & FATAL_BITS) == 0
        chi = ((bcd - truth) / unc)[good]
        assert 0.8 < _robust_std(chi) < 1.25
        # DCENUM 0..2 included: after correction within 1%
        assert abs(np.median(bcd[good] / truth[good]) - 1) < 0.01


def test_sim_bright_sources_saturation_and_chi(sim_bright) -> None:
    cal = MipsCalibration.from_hdus(sim_bright.calibration)
    n_sat = 0
    for raw in sim_bright.raw_dces:
        h = raw[0].header
        p = calibrate_mips24_dce(raw, cal)
        truth = sim_bright.truth_bcd(1, h["EXPID"], h["DCENUM"])
        bcd, unc, m = p.bcd[0].data, p.bunc[0].data, p.mask[0].data
        good = (m & FATAL_BITS) == 0
        sat = good & ((m & SAT) != 0)
        bright = good & (truth > 40) & ~sat
        assert bright.sum() > 10
        assert abs(np.median(bcd[bright] / truth[bright]) - 1) < 0.005
        chi = ((bcd - truth) / unc)[good]
        assert 0.8 < chi.std() < 1.25, f"DCE {h['DCENUM']}: chi std {chi.std():.3f}"
        if sat.any():
            assert np.all(np.abs(bcd[sat] / truth[sat] - 1) < 0.05)
        n_sat += int(sat.sum())
        # clipped ramps: the true last sample reached full well
        flat = cal.get(1, "FLAT").data
        level = (truth / mips.BANDS[1].fluxconv * flat) * h["NSAMPLES"] * mips.SI_SAMPLE_S
        assert np.all(sat[good & (level > 1.1 * h["SATLEVEL"])])
    assert n_sat > 20


def test_wcs_places_truth_sources(sim_bright) -> None:
    from astropy.wcs import WCS
    from photutils.centroids import centroid_2dg

    raw = sim_bright.raw_dces[3]
    h = raw[0].header
    p = calibrate_mips24_dce(raw, MipsCalibration.from_hdus(sim_bright.calibration))
    wcs = WCS(p.bcd[0].header, relax=True)
    truth = sim_bright.truth_bcd(1, h["EXPID"], h["DCENUM"])
    src = sim_bright.truth_sources
    x, y = wcs.all_world2pix(src["ra"], src["dec"], 0)
    # isolated, bright, well inside the array: the noiseless truth image centroid
    checked = 0
    for i in np.argsort(-np.asarray(src["flux_24_ujy"])):
        xi, yi = float(x[i]), float(y[i])
        if not (8 < xi < 119 and 8 < yi < 119):
            continue
        d = np.hypot(x - xi, y - yi)
        if np.sort(d)[1] < 8:
            continue
        x0, y0 = round(xi), round(yi)
        stamp = truth[y0 - 5 : y0 + 6, x0 - 5 : x0 + 6]
        cx, cy = centroid_2dg(stamp - np.median(truth))
        ra, dec = wcs.all_pix2world(x0 - 5 + cx, y0 - 5 + cy, 0)
        sep = np.hypot((ra - src["ra"][i]) * np.cos(np.radians(dec)), dec - src["dec"][i]) * 3600
        assert sep < 0.1
        checked += 1
        if checked == 5:
            break
    assert checked >= 3


def test_wrong_channel_and_missing_keyword_raise() -> None:
    case = simulate_24(5, n_cr=0)
    cal = MipsCalibration.from_hdus(case.calibration)
    bad = case.raw.copy()
    bad[0] = bad[0].copy()
    del bad[0].header["SLPSCALE"]
    with pytest.raises(RawProductError, match="SLPSCALE"):
        calibrate_mips24_dce(bad, cal)
    bad[0].header["CHNLNUM"] = 2
    with pytest.raises(ValueError, match="CHNLNUM"):
        calibrate_mips24_dce(bad, cal)
