"""A MIPS AOR whose optics are diffraction-limited (the obscured Airy pattern of the 85 cm
mirror, rings and all, as the real MIPS PSF) through the whole pipeline on the bus: the
extraction must notice that the PSF is not a Gaussian, fit the diffraction PRF, and give
unbiased fluxes without reporting pieces of the rings as sources (with the Gaussian PRF the
fluxes come out at ~0.7 and each bright source brings several ring detections:
`tests/extract/test_prf_model.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

from shared.instruments import mips
from tests.integration.conftest import PipelineRun, run_simulated_aor

BANDS = {1: "24um", 2: "70um"}
FLUX_COL = {1: "flux_24_ujy", 2: "flux_70_ujy"}


@pytest.fixture(scope="module")
def airy_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRun]:
    from simulator import mips as sim_mips

    # The small AOR (one raster position, 6 DCEs per band) with a denser, brighter sky.
    cfg = sim_mips.MipsAORConfig.small(psf="airy", n_sources=60, flux_24_min_ujy=400.0,
                                       sky_half_arcsec=140.0, seed=777)
    yield run_simulated_aor(cfg, tmp_path_factory.mktemp("mips_airy"))


def _table(run: PipelineRun, product_type: str, channel: int | None = None) -> Table:
    for p in run.products("sources", product_type):
        if channel is None or int(p.obs.channel or 0) == channel:
            key = next(c.key for c in (p.primary, *p.companions) if c.key.endswith(".fits"))
            return Table.read(run.store_root / key)
    raise AssertionError(f"no {product_type} product for channel {channel}")


def _offsets(ra: np.ndarray, dec: np.ndarray, dec0: float) -> np.ndarray:
    return np.column_stack([np.asarray(ra) * np.cos(np.radians(dec0)), np.asarray(dec)]) * 3600


def _mutual_matches(t: Table, truth: Table, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(truth index, detection index) of mutual nearest neighbours within `radius` arcsec."""
    dec0 = float(np.mean(truth["dec"]))
    tp = _offsets(truth["ra"], truth["dec"], dec0)
    dp = _offsets(t["RA"], t["Dec"], dec0)
    d, j = cKDTree(dp).query(tp)
    _, i = cKDTree(tp).query(dp)
    ok = (d < radius) & (i[j] == np.arange(len(tp)))
    return np.flatnonzero(ok), j[ok]


def test_the_diffraction_prf_is_chosen_at_24um(airy_run: PipelineRun) -> None:
    """The 24 um list says which PRF it fitted: the obscured Airy pattern, lambda/D within 2%
    of the truth (23.68 um / 85 cm = 5.75") and the obscuration within 0.1 of it (0.3)."""
    t = _table(airy_run, "sources", 1)
    print({k: t.meta.get(k) for k in ("PRFMODEL", "PRFLAMD", "PRFOBSC", "PRFBLUR", "PRFDCHI2")})
    assert t.meta["PRFMODEL"] == "obscured Airy"
    assert t.meta["PRFLAMD"] == pytest.approx(mips.BANDS[1].lambda_over_d_arcsec, rel=0.02)
    assert t.meta["PRFOBSC"] == pytest.approx(0.3, abs=0.1)


def _spurious(t: Table, truth: Table, fwhm: float) -> tuple[int, int]:
    """(detections above S/N 5 with no truth source within FWHM/2, detections above S/N 5)."""
    dec0 = float(np.mean(truth["dec"]))
    d, _ = cKDTree(_offsets(truth["ra"], truth["dec"], dec0)).query(
        _offsets(t["RA"], t["Dec"], dec0))
    above5 = np.asarray(t["SNR"]) > 5
    return int((above5 & (d > fwhm / 2)).sum()), int(above5.sum())


def test_24um_fluxes_with_the_diffraction_prf(airy_run: PipelineRun) -> None:
    """Matched 24 um sources with measured S/N > 50: median PRF flux / true within 2% of 1
    (the issue's 24 um tolerance; the PRF's lambda/D, obscuration and blur are estimated from
    the ~15 bright sources of this small AOR, and the flux scale follows them: 0.1 px more
    blur is +1.5%; measured 0.990 here, 1.007 on the default AOR), robust scatter <= 3%."""
    t = _table(airy_run, "sources", 1)
    truth = airy_run.sim.truth_sources  # type: ignore[attr-defined]
    it, jd = _mutual_matches(t, truth, mips.BANDS[1].psf_fwhm_arcsec / 2)
    snr = np.asarray(t["SNR"])[jd]
    ratio = np.asarray(t["flux"])[jd] / np.asarray(truth[FLUX_COL[1]])[it]
    bright = snr > 50
    med = float(np.median(ratio[bright]))
    mad = 1.4826 * float(np.median(np.abs(ratio[bright] - med)))
    print(f"24 um: {len(t)} detections, {bright.sum()} bright, flux/true {med:.4f} "
          f"(scatter {mad:.4f})")
    assert bright.sum() >= 5
    assert med == pytest.approx(1.0, abs=0.02)
    assert mad <= 0.03


@pytest.mark.parametrize("channel", [1, 2])
def test_rings_are_not_sources(airy_run: PipelineRun, channel: int) -> None:
    """Detections above S/N 5 with no truth source within FWHM/2 (pieces of rings, or
    anything else): <= 2% in each band."""
    t = _table(airy_run, "sources", channel)
    truth = airy_run.sim.truth_sources  # type: ignore[attr-defined]
    spurious, above5 = _spurious(t, truth, mips.BANDS[channel].psf_fwhm_arcsec)
    print(f"ch{channel} ({t.meta['PRFMODEL']}): {spurious} spurious of {above5} above S/N 5")
    assert above5 >= 5
    assert spurious <= 0.02 * above5


def test_upper_limits_hold_with_the_diffraction_psf(airy_run: PipelineRun) -> None:
    """Band-merged 70 um upper limits (forced photometry on the BCDs with the PSF the 70 um
    extraction chose) at truth sources that the 70 um list does not detect: >= 95% of their
    true fluxes lie below the limit."""
    merged = _table(airy_run, "bandmerged")
    truth = airy_run.sim.truth_sources  # type: ignore[attr-defined]
    t70 = _table(airy_run, "sources", 2)
    detected = np.zeros(len(truth), dtype=bool)
    detected[_mutual_matches(t70, truth, mips.BANDS[2].psf_fwhm_arcsec / 2)[0]] = True
    rows = merged[merged["flag_70um"] == "U"]
    it, jr = _mutual_matches(rows, truth, mips.BANDS[1].psf_fwhm_arcsec / 2)
    keep = ~detected[it]
    true = np.asarray(truth["flux_70_ujy"])[it[keep]]
    ulim = np.asarray(rows["ulim_70um"])[jr[keep]]
    below = float(np.mean(true < ulim))
    print(f"70 um limits: {keep.sum()} rows, true < ulim for {below:.3f}")
    assert keep.sum() >= 5
    assert below >= 0.95


@pytest.fixture(scope="module")
def lent_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRun]:
    from simulator import mips as sim_mips

    # A fainter sky: enough bright 24 um sources to choose the diffraction pattern, too few
    # at 70 um (S/N >= 30) to test it there.
    cfg = sim_mips.MipsAORConfig.small(psf="airy", n_sources=60, flux_24_min_ujy=300.0,
                                       sky_half_arcsec=140.0, seed=778)
    yield run_simulated_aor(cfg, tmp_path_factory.mktemp("mips_airy_lent"))


def test_70um_detections_are_measured_with_the_lent_pattern(lent_run: PipelineRun) -> None:
    """This AOR's 70 um band has too few bright sources to test its PSF (PRFTEST 0), so
    its list keeps the Gaussian: fluxes ~0.8 of the truth on diffraction-limited data. 24 um
    chose the diffraction pattern; band-merge measures the 70 um detections again on the BCDs
    with it (meta DFPSFLNT): their merged fluxes are unbiased."""
    truth = lent_run.sim.truth_sources  # type: ignore[attr-defined]
    t70 = _table(lent_run, "sources", 2)
    merged = _table(lent_run, "bandmerged")
    assert _table(lent_run, "sources", 1).meta["PRFMODEL"] == "obscured Airy"
    assert t70.meta["PRFTEST"] == 0 and t70.meta["PRFMODEL"] == "Gaussian"
    assert merged.meta["DFPSFLNT"] == "70um"
    radius = mips.BANDS[2].psf_fwhm_arcsec / 2
    it, jl = _mutual_matches(t70, truth, radius)
    rows = merged[merged["flag_70um"] == "D"]
    im, jm = _mutual_matches(rows, truth, radius)
    true_l = np.asarray(truth["flux_70_ujy"])[it]
    true_m = np.asarray(truth["flux_70_ujy"])[im]
    r_list = float(np.median(np.asarray(t70["flux"])[jl] / true_l))
    r_merged = float(np.median(np.asarray(rows["flux_70um"])[jm] / true_m))
    print(f"70 um detections, flux / true: list (Gaussian) {r_list:.3f} on {it.size}, "
          f"band-merged (lent pattern) {r_merged:.3f} on {im.size}")
    assert im.size >= 5
    assert r_list < 0.9
    assert r_merged == pytest.approx(1.0, abs=0.05)
