"""Ge (70 um) group calibration: ramp fits with jumps, stim responsivity, fbcd."""

from __future__ import annotations

import numpy as np
import pytest
from _mips_calib_forward import ge_responsivity, simulate_ge

from services.calibrate.mips import (
    MipsCalibrateConfig,
    MipsCalibration,
    RawProductError,
    calibrate_ge_group,
    ramps,
    stim,
)
from shared.instruments.mips import FATAL_BITS, MaskBit

CFG = MipsCalibrateConfig(ge_read_noise_dn=8.0, ge_gain_e_per_dn=5.0)  # the forward model's


def test_ramp_fit_rejects_jumps_and_reports_noise() -> None:
    rng = np.random.default_rng(0)
    n, dt, rate, gain, rn = 80, 1 / 8, 30.0, 5.0, 8.0
    inc = rng.poisson(np.full((n, 48, 48), rate * dt * gain)) / gain
    jumps = np.zeros_like(inc)
    hit = rng.random((48, 48)) < 0.3
    k = rng.integers(1, n, (48, 48))
    jumps[k, np.arange(48)[:, None], np.arange(48)[None, :]] = np.where(hit, 400.0, 0.0)
    s = np.cumsum(inc + jumps, 0) + 1000 + rn * rng.standard_normal((n, 48, 48))
    r = ramps.ge_rates(
        np.round(s).astype(np.int32), n_ramps=1, sat_level_dn=6e4, read_noise_dn=rn,
        gain_e_per_dn=gain, jump_nsigma=5.0,
    )  # fmt: skip
    assert abs(np.median(r.rate_dn_s) - rate) < 0.1
    flagged = (r.mask & int(MaskBit.RAMP_JUMP)) != 0
    assert np.all(flagged[hit])
    chi = (r.rate_dn_s - rate) / np.sqrt(r.var_dn2_s2)
    assert 0.85 < chi[~hit].std() < 1.15
    assert np.abs(chi[hit]).max() < 6  # jumps removed, not just flagged
    # two ramps per DCE (160 um): each restarts
    two = np.concatenate([s[:40], s[40:] - s[40] + 1000])
    r2 = ramps.ge_rates(
        np.round(two).astype(np.int32), n_ramps=2, sat_level_dn=6e4, read_noise_dn=rn,
        gain_e_per_dn=gain, jump_nsigma=5.0,
    )  # fmt: skip
    assert abs(np.median(r2.rate_dn_s) - rate) < 0.2


def test_responsivity_interpolation_and_nearest() -> None:
    ms = [
        stim.StimMeasurement(100.0, 2.0, 0.01, 100, True),
        stim.StimMeasurement(200.0, 4.0, 0.01, 100, True),
        stim.StimMeasurement(300.0, -1.0, 0.01, 100, False),
    ]
    r = stim.responsivity_at(150.0, ms, min_responsivity=1e-3)
    assert r.value == pytest.approx(3.0) and not r.no_stim
    assert stim.responsivity_at(50.0, ms, min_responsivity=1e-3).value == pytest.approx(2.0)
    late = stim.responsivity_at(290.0, ms, min_responsivity=1e-3)
    assert late.value == pytest.approx(4.0) and late.no_stim and late.method == "nearest"
    none = stim.responsivity_at(10.0, [ms[2]], min_responsivity=1e-3)
    assert none.value == 1.0 and none.no_stim


def test_forward_model_group_recovers_truth_with_drifting_responsivity() -> None:
    case = simulate_ge(2)
    prods = calibrate_ge_group(case.raws, MipsCalibration.from_hdus(case.calibration), CFG)
    assert len(prods) == len(case.truths)
    assert [(p.expid, p.dcenum) for p in prods] == case.science_keys
    resp = np.array([p.bcd[0].header["RESPONSV"] for p in prods])
    times = np.array([float(p.bcd[0].header["SCLK_OBS"]) - 8.0e8 + 5.0 for p in prods])
    truth_resp = 1000.0 * ge_responsivity(times)
    assert np.all(np.abs(resp / truth_resp - 1) < 0.02)
    assert np.ptp(truth_resp) / truth_resp.mean() > 0.05  # the drift is real
    for p, truth in zip(prods, case.truths, strict=True):
        m = p.mask[0].data
        good = (m & FATAL_BITS) == 0
        assert np.all(m[16:, :] & int(MaskBit.BAD_HALF))
        assert abs(np.median(p.bcd[0].data[good] / truth[good]) - 1) < 0.02


def test_sim_ge_matches_truth(sim_small) -> None:
    cal = MipsCalibration.from_hdus(sim_small.calibration)
    raws = [r for r in sim_small.raw_dces if r[0].header["CHNLNUM"] == 2]
    n_stim = sum(bool(r[0].header["STIMFLSH"]) for r in raws)
    assert n_stim >= 2
    prods = calibrate_ge_group(raws, cal)
    assert len(prods) == len(raws) - n_stim
    for p in prods:
        truth = sim_small.truth_bcd(2, p.expid, p.dcenum)
        m = p.mask[0].data
        good = (m & FATAL_BITS) == 0
        assert good.sum() > 400
        assert abs(np.median(p.bcd[0].data[good] / truth[good]) - 1) < 0.02
        chi = ((p.bcd[0].data - truth) / p.bunc[0].data)[good]
        assert 0.8 < 1.4826 * np.median(np.abs(chi - np.median(chi))) < 1.25
        # fbcd: background removed, sources kept
        f = p.fbcd[0].data
        assert abs(np.median(f[good])) < 0.2 * np.median(truth[good])


def test_stim_skipped_without_stim_file(sim_small) -> None:
    cal = MipsCalibration.from_hdus(
        [h for h in sim_small.calibration if h[0].header["CALTYPE"] != "STIM"]
    )
    raws = [r for r in sim_small.raw_dces if r[0].header["CHNLNUM"] == 2]
    prods = calibrate_ge_group(raws, cal)
    hdr = prods[0].bcd[0].header
    assert hdr["RESPCORR"] == "SKIPPED"
    assert np.all(prods[0].mask[0].data & int(MaskBit.NO_STIM))


def test_mixed_group_raises(sim_small) -> None:
    raws = [r for r in sim_small.raw_dces if r[0].header["CHNLNUM"] == 2]
    other = raws[0].copy()
    other[0] = other[0].copy()
    other[0].header["AORKEY"] = 1
    with pytest.raises(RawProductError, match="one AOR"):
        calibrate_ge_group([*raws, other], MipsCalibration.from_hdus(sim_small.calibration))
