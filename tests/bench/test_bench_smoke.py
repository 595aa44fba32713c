"""Smoke test of the peer benchmarks in quick mode: finite timings and accuracies, no timing
assertions (the machine is shared and noisy)."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest

pytest.importorskip("sep")
pytest.importorskip("sip_tpv")
if shutil.which("SWarp") is None or shutil.which("source-extractor") is None:
    pytest.skip("SWarp / source-extractor not installed (make bench-tools)",
                allow_module_level=True)

from bench import __main__ as bench_main
from bench import common
from bench import extract_vs_sextractor as ext
from bench import mosaic_vs_swarp as mos


@pytest.fixture(scope="module")
def quick_data(tmp_path_factory: pytest.TempPathFactory) -> common.BenchBCDs:
    return common.load_or_make_bcds(common.aor_config(True), tmp_path_factory.mktemp("bcds"),
                                    log=lambda _s: None)


@pytest.fixture(scope="module")
def mosaic_result(quick_data: common.BenchBCDs) -> mos.MosaicBenchResult:
    return mos.run(quick_data, runs=1, combine_types=("WEIGHTED",), log=lambda _s: None)


def test_mosaic_bench_finite(mosaic_result: mos.MosaicBenchResult) -> None:
    for name in ("skybus", "skybus+read", "SWarp WEIGHTED"):
        t = mosaic_result.timings[name].median_s
        assert math.isfinite(t) and t > 0, name
    for name in ("skybus", "SWarp WEIGHTED"):
        a = mosaic_result.accuracy[name]
        assert a.n_sources > 0
        assert math.isfinite(a.flux_ratio_median) and math.isfinite(a.astrom_rms_arcsec)
        assert math.isfinite(a.bkg_noise_mjysr)
    assert all(math.isfinite(r) for r in mosaic_result.ratio.values())
    assert sum(s for _, s in mosaic_result.breakdown) > 0


def test_extract_bench_finite(mosaic_result: mos.MosaicBenchResult,
                              quick_data: common.BenchBCDs) -> None:
    e = ext.run(mosaic_result.mosaic, quick_data.truth, runs=1, log=lambda _s: None)
    for name in ("skybus", "sep", "SExtractor"):
        assert math.isfinite(e.timings[name].median_s) and e.timings[name].median_s > 0
        a = e.accuracy[name]
        assert a.n_detected > 0
        assert math.isfinite(a.completeness_snr10)
    text = bench_main.render(mosaic_result, e, "tauvex: skipped", runs=1, quick=True, wall_s=1.0)
    assert "skybus / SWarp" in text and "## Goals" in text


def test_diffraction_limited_extract_bench(tmp_path_factory: pytest.TempPathFactory,
                                           mosaic_result: mos.MosaicBenchResult) -> None:
    # The quick AOR's diffraction-limited twin: skybus takes the pattern, and its section
    # renders beside the Gaussian one.
    e = bench_main.run_airy(True, 1, out_dir=tmp_path_factory.mktemp("bcds_airy"),
                            log=lambda _s: None)
    assert e.paired_sep_s.size == 0
    for name in ("skybus", "sep", "SExtractor"):
        assert math.isfinite(e.timings[name].median_s) and e.timings[name].median_s > 0
        assert e.accuracy[name].n_detected > 0
    assert "/ EE 0.6" in e.config["sep"]  # the pattern's encircled energy, not the Gaussian's
    text = bench_main.render(mosaic_result, e, "tauvex: skipped", runs=1, quick=True,
                             wall_s=1.0, e_airy=e)
    assert "## 2b. Extraction on a diffraction-limited mosaic" in text


def test_airy_encircled_energy_is_the_pattern_s() -> None:
    # Unobscured and with a tiny pixel box (0.5", a tenth of lambda/D) it is Rayleigh's
    # 1 - J0^2 - J1^2; the mosaic's 2.45" pixel box moves light out of a small aperture.
    from scipy.special import j0, j1

    lod = common.BAND.lambda_over_d_arcsec
    cfg = common.aor_config(True, psf="airy")
    for r in (3.0, 7.0, 15.0):
        v = math.pi * r / lod
        clear = dataclasses.replace(cfg, airy_obscuration=0.0)
        assert common.airy_encircled_energy(r, clear, 0.5) == pytest.approx(
            1 - j0(v) ** 2 - j1(v) ** 2, abs=2e-3)
    assert common.airy_encircled_energy(3.0, cfg, 2.45) < common.airy_encircled_energy(
        3.0, cfg, 0.5)


def test_sextractor_threshold_equivalence() -> None:
    # A normalised Gaussian kernel of sigma s: sum(k)/sqrt(sum(k^2)) ~ 2 sqrt(pi) s.
    fwhm = 2.4
    sig = fwhm / (2 * math.sqrt(2 * math.log(2)))
    assert ext._sep_threshold_equiv(fwhm) == pytest.approx(
        ext.DETECT_SNR / (2 * math.sqrt(math.pi) * sig), rel=0.05)
