"""Benchmark: skybus `extract_sources` against sep and SExtractor on the same 24 um mosaic.

Run: python -m bench.extract_vs_sextractor [--quick] [--runs N] (builds the skybus mosaic of
`bench.mosaic_vs_swarp`'s BCDs first). All three detect at a matched-filter S/N of 5 with a
Gaussian filter of the PSF FWHM, use a comparable background mesh, the mosaic's uncertainty
map calibrated against the measured background RMS, and a 1.2 FWHM aperture; sep and
SExtractor aperture fluxes are corrected with the same Gaussian encircled energy as skybus's.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from bench import common
from services.extract.jit import compile_kernels
from services.extract.photometry import extract_sources
from services.mosaic.coadd import Mosaic
from simulator import sky as skymod

#: Detection threshold: S/N of the PSF-matched filter (skybus's default, detect_sigma).
DETECT_SNR = 5.0
#: Aperture radius of every side (1.2 FWHM, skybus's default), arcsec.
APERTURE_RADIUS_ARCSEC = 1.2 * common.FWHM_ARCSEC
#: Minimum connected pixels above threshold for sep / SExtractor.
MINAREA = 3
#: alternating skybus / sep calls for the paired ratio (each call takes ~40 ms)
PAIRED_RUNS = 31
#: sep's and SExtractor's cleaning of spurious detections in bright sources' wings. Off: on
#: the bench mosaic (matched-filter detection, Gaussian PSF) sep's cleaning (clean_param 1)
#: removes 49 of its 111 detections, every one a real source (none is spurious without it),
#: and completeness at S/N >= 10 falls from 0.85 to 0.57.
CLEAN = False


@dataclass
class ExtractAccuracy:
    n_detected: int
    completeness_snr10: float  #: fraction of truth sources with expected S/N >= 10 found
    n_truth_snr10: int
    spurious_frac: float  #: detections (S/N >= 10) with no truth source within 3"
    n_bright: int
    flux_ratio_median: float  #: measured / truth flux, bright isolated sources
    flux_ratio_scatter: float  #: robust std of that ratio
    astrom_rms_arcsec: float  #: RMS radial offset of bright sources from truth


@dataclass(frozen=True, slots=True)
class Phase:
    """One step of an extraction and its time per call (s)."""

    label: str
    seconds: float
    sep_does: bool  #: whether sep's timed run does this step too


@dataclass
class ExtractBenchResult:
    shape: tuple[int, int]
    timings: dict[str, common.Timing[object]]
    accuracy: dict[str, ExtractAccuracy]
    config: dict[str, str]
    sextractor_version: str
    notes: list[str] = field(default_factory=list)
    #: skybus's steps (cProfile, per call, with profiling overhead) and their total
    skybus_phases: list[Phase] = field(default_factory=list)
    skybus_profile_total_s: float = float("nan")
    skybus_profile_calls: int = 10
    #: sep's steps, timed one by one (median of the runs, no profiler)
    sep_phases: list[Phase] = field(default_factory=list)
    #: (skybus s, sep s) of alternating calls, one row per pair
    paired_sep_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    @property
    def paired_ratio(self) -> tuple[float, float, float]:
        """Median and quartiles of skybus / sep over the alternating pairs."""
        if not self.paired_sep_s.size:
            return (float("nan"),) * 3
        r = self.paired_sep_s[:, 0] / self.paired_sep_s[:, 1]
        q1, med, q3 = np.percentile(r, [25, 50, 75])
        return float(med), float(q1), float(q3)

    @property
    def ratio(self) -> dict[str, float]:
        sky = self.timings["skybus"].median_s
        return {k: sky / t.median_s for k, t in self.timings.items() if k != "skybus"}


@dataclass(frozen=True, slots=True)
class Catalogue:
    """What every side hands to the accuracy code: 0-based pixels, flux (uJy) and S/N."""

    x: np.ndarray
    y: np.ndarray
    flux_ujy: np.ndarray
    snr: np.ndarray


#: Steps of `extract_sources`: (function called by it, label, whether sep does the step too).
#: A function missing here (renamed, or new) lands in "other".
_SKYBUS_PHASES: tuple[tuple[str, str, bool], ...] = (
    ("estimate_background", "background mesh and RMS map", True),
    ("estimate_fwhm_px", "PSF FWHM measurement (joint fit of bright isolated sources)", False),
    ("matched_filter", "matched filter and its noise calibration", True),
    ("find_peaks", "peaks and segments (both detection passes)", True),
    ("choose_prf", "PRF model check (Gaussian or diffraction pattern)", False),
    ("fit_sources", "PRF fits (main, residual-pass and clean-up refits)", False),
    ("refilter", "residual-pass matched filter", False),
    ("aperture_fluxes", "aperture photometry", True),
    ("_celestial_wcs", "WCS from the header", False),
    ("pixel_to_world_values", "pixel -> RA, Dec", False),
    ("__init__", "output table (astropy Table)", False),
)


def profile_extract(call: object, n_calls: int = 10) -> tuple[list[Phase], float]:
    """cProfile `n_calls` calls of `call` (an extract_sources closure): the time per call of
    each function `extract_sources` calls directly, grouped as in `_SKYBUS_PHASES`, and the
    total per call (profiling overhead included)."""
    assert callable(call)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_calls):
        call()
    prof.disable()
    raw = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    key = next(k for k in raw if k[2] == "extract_sources" and "services/extract" in k[0])
    total = raw[key][3] / n_calls
    phases: list[Phase] = []
    for fname, label, sep_does in _SKYBUS_PHASES:
        # Time of `fname` when called from extract_sources itself (not from its helpers).
        ct = sum(v[4][key][3] for k, v in raw.items() if k[2] == fname and key in v[4])
        phases.append(Phase(label, ct / n_calls, sep_does))
    phases.append(Phase("other (masks, weights, columns)",
                        max(0.0, total - sum(p.seconds for p in phases)), False))
    return phases, total


def _gauss_conv(fwhm_px: float) -> str:
    """A SExtractor .conv file: a normalised Gaussian of `fwhm_px` sampled to +-3 sigma."""
    sig = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = max(1, math.ceil(3.0 * sig))
    off = np.arange(-half, half + 1)
    k = np.exp(-(off[:, None] ** 2 + off[None, :] ** 2) / (2.0 * sig**2))
    rows = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in k)
    return f"CONV NORM\n# Gaussian FWHM {fwhm_px:.3f} px\n{rows}\n"


def _sep_threshold_equiv(fwhm_px: float) -> float:
    """SExtractor's DETECT_THRESH (per-pixel sigmas on the normalised-kernel filtered image)
    equivalent to a matched-filter S/N of DETECT_SNR: S/N_mf = (F / sigma) x sum(k) /
    sqrt(sum(k^2)), with the kernel sampled as in `_gauss_conv`."""
    sig = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = max(1, math.ceil(3.0 * sig))
    off = np.arange(-half, half + 1)
    k = np.exp(-(off[:, None] ** 2 + off[None, :] ** 2) / (2.0 * sig**2))
    return DETECT_SNR * float(np.sqrt(np.sum(k**2)) / np.sum(k))


def run(mosaic: Mosaic, truth: Table, *, runs: int = 3, workdir: Path | None = None,
        log: object = print, aperture_ee: float | None = None,
        paired_runs: int = PAIRED_RUNS, profile_calls: int = 10) -> ExtractBenchResult:
    """Time and measure skybus, sep and SExtractor (each skipped when missing) on `mosaic`.
    The peers' aperture fluxes are divided by `aperture_ee`, the PSF's encircled energy in
    the aperture (default: the Gaussian's of the band FWHM, the simulator's default PSF);
    `paired_runs` alternating skybus / sep calls (at most one with `runs` 1);
    `profile_calls` calls of skybus under cProfile for the breakdown of its time."""
    import sep

    say = log if callable(log) else print
    img = np.ascontiguousarray(mosaic.image, dtype=np.float64)
    unc = np.ascontiguousarray(mosaic.unc, dtype=np.float64)
    cov = np.ascontiguousarray(mosaic.coverage, dtype=np.float64)
    header = mosaic.header.copy()
    header["INSTRUME"] = "MIPS"
    header["CHNLNUM"] = 1
    pix = mosaic.pixel_arcsec
    ujy_per_pix = common.BAND.ujy_per_mjysr(pix)
    fwhm_px = common.FWHM_ARCSEC / pix
    valid = np.isfinite(img) & np.isfinite(unc) & (unc > 0) & (cov > 0)
    # skybus's default background cell (16 FWHM, >= 32 px, >= 4 cells across): the peers' too.
    box = round(min(max(32.0, 16.0 * fwhm_px), max(min(img.shape) / 4.0, 6.0 * fwhm_px)))
    r_as = APERTURE_RADIUS_ARCSEC
    r_px = r_as / pix
    # The same Gaussian-PSF correction skybus applies (mosaic pixel box added in quadrature).
    fwhm_eff = math.sqrt(common.FWHM_ARCSEC**2 + 8.0 * math.log(2.0) * pix**2 / 12.0)
    ee = skymod.gaussian_encircled_energy(r_as, fwhm_eff) if aperture_ee is None else aperture_ee
    timings: dict[str, common.Timing[object]] = {}
    cats: dict[str, Catalogue] = {}
    notes: list[str] = []

    def run_skybus() -> Table:
        return extract_sources(img, unc, cov, header, fwhm_arcsec=None, band_name="24um",
                               detect_sigma=DETECT_SNR)

    # The PRF fits are compiled (numba) once per install and cached on disk; that one-off cost
    # is reported, not counted in the per-extraction time (sep's C is compiled at install too).
    jit_s = compile_kernels()
    notes.append(f"skybus's compiled PRF-fit kernels (numba): {jit_s:.2f} s to compile or load "
                 "from the on-disk cache before the timed runs (~40 s the first time after "
                 "install, ~0.4 s later), once per process.")
    timings["skybus"] = common.time_runs(run_skybus, runs)
    t = timings["skybus"].result
    assert isinstance(t, Table)
    cats["skybus"] = Catalogue(np.asarray(t["x"], float), np.asarray(t["y"], float),
                               np.asarray(t["flux"], float), np.asarray(t["SNR"], float))
    cats["skybus (aperture)"] = Catalogue(
        np.asarray(t["x"], float), np.asarray(t["y"], float), np.asarray(t["flux_ap"], float),
        np.asarray(t["flux_ap"], float) / np.asarray(t["delta_flux_ap"], float))
    say(f"skybus extract_sources: median {timings['skybus'].median_s:.2f} s, {len(t)} sources "
        f"(PRF {t.meta.get('PRFMODEL')}, mismatch PRFMISM {t.meta.get('PRFMISM')})")

    mask = ~valid
    img0 = np.where(valid, img, 0.0)
    kernel_sig = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = max(1, math.ceil(3.0 * kernel_sig))
    off = np.arange(-half, half + 1)
    kernel = np.exp(-(off[:, None] ** 2 + off[None, :] ** 2) / (2.0 * kernel_sig**2))

    # The peers' error map: munc x the matched-filter noise calibration measured here (not
    # timed; skybus measures its own inside extract_sources). A mesh RMS calibration would
    # include the sky gradient within each mesh (x4 here) and a per-pixel one misses the
    # resampled mosaic's correlated noise.
    bkg0 = sep.Background(img0, mask=mask, bw=box, bh=box, fw=3, fh=3)
    tx, ty = WCS(mosaic.header).all_world2pix(np.asarray(truth["ra"], float),
                                              np.asarray(truth["dec"], float), 0)
    free = common.source_free_mask(img.shape, tx, ty, np.asarray(truth["flux_24_ujy"], float),
                                   fwhm_px=fwhm_px)
    scale = common.noise_calibration(img0 - bkg0.back(), unc, valid, fwhm_px=fwhm_px,
                                     source_free=free)
    err = np.where(valid, unc * scale, 1e30)
    sig_px = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))

    # The same calibration per coverage decile: the mosaic's noise / munc is several times
    # larger where few frames overlap; a second sep run shows what a local calibration changes.
    err_cov, cov_factors = _per_coverage_error(img0 - bkg0.back(), unc, cov, valid, free,
                                               fwhm_px=fwhm_px)

    def run_sep(error: np.ndarray = err) -> Catalogue:
        bkg = sep.Background(img0, mask=mask, bw=box, bh=box, fw=3, fh=3)
        sub = img0 - bkg.back()
        objs = sep.extract(sub, DETECT_SNR, err=error, mask=mask, minarea=MINAREA,
                           filter_kernel=kernel, filter_type="matched", clean=CLEAN)
        x, y, _ = sep.winpos(sub, objs["x"], objs["y"], sig_px, mask=mask)
        flux, ferr, _ = sep.sum_circle(sub, x, y, r_px, err=error, mask=mask, subpix=0)
        return Catalogue(np.asarray(x, float), np.asarray(y, float), flux * ujy_per_pix / ee,
                         flux / ferr)

    # sep allocates its pixel stack on every extract call: 2,000,000 entries cost more in page
    # faults than the extraction itself on a VM (extract 30 -> 80-110 ms on this mosaic), so
    # sep's time would not be its compute. Its default, 300,000 (or the image's pixel count if
    # larger), gives the same catalogue here.
    sep.set_extract_pixstack(max(300_000, img0.size))
    timings["sep"] = common.time_runs(run_sep, runs)
    cats["sep"] = timings["sep"].result  # type: ignore[assignment]
    say(f"sep: median {timings['sep'].median_s:.3f} s, {cats['sep'].x.size} sources")
    # The machine is shared and its speed drifts within seconds: skybus and sep alternate,
    # call by call, and the ratio of each pair is taken (both see the same machine state).
    pairs = []
    for _ in range(paired_runs if runs > 1 else min(paired_runs, 1)):
        t0 = time.perf_counter()
        run_skybus()
        t1 = time.perf_counter()
        run_sep()
        pairs.append((t1 - t0, time.perf_counter() - t1))
    paired = np.asarray(pairs, dtype=float).reshape(-1, 2)
    if paired.size:
        say(f"paired skybus / sep: median {np.median(paired[:, 0] / paired[:, 1]):.2f}")
    timings["sep (err per coverage)"] = common.time_runs(lambda: run_sep(err_cov), runs)
    cats["sep (err per coverage)"] = timings["sep (err per coverage)"].result  # type: ignore[assignment]
    notes.append("sep (err per coverage): munc x the matched-filter calibration of each coverage "
                 "decile (" + ", ".join(f"{f:.2f}" for f in cov_factors) + ", shallowest first).")

    # Where each side's time goes: skybus under cProfile, sep's three calls timed one by one.
    sky_phases, sky_total = profile_extract(run_skybus, profile_calls)
    n_part = max(5, 3 * runs)
    t_bkg = common.time_runs(
        lambda: sep.Background(img0, mask=mask, bw=box, bh=box, fw=3, fh=3), n_part)
    sub0 = img0 - t_bkg.result.back()
    t_ext = common.time_runs(
        lambda: sep.extract(sub0, DETECT_SNR, err=err, mask=mask, minarea=MINAREA,
                            filter_kernel=kernel, filter_type="matched", clean=CLEAN),
        n_part)
    objs = t_ext.result

    def sep_photometry() -> None:
        x, y, _ = sep.winpos(sub0, objs["x"], objs["y"], sig_px, mask=mask)
        sep.sum_circle(sub0, x, y, r_px, err=err, mask=mask, subpix=0)

    t_phot = common.time_runs(sep_photometry, n_part)
    sep_phases = [
        Phase("background mesh and RMS map (sep.Background)", t_bkg.median_s, True),
        Phase("matched filter with the error map, thresholding, deblending (sep.extract)",
              t_ext.median_s, True),
        Phase("windowed centres and aperture photometry (sep.winpos, sep.sum_circle)",
              t_phot.median_s, True),
    ]

    config = {
        "skybus": f"extract_sources defaults (detect_sigma {DETECT_SNR:g}, band FWHM "
        f"{common.FWHM_ARCSEC}\", background box {box} px, aperture r = 1.2 FWHM, PRF-fit "
        "fluxes; aperture fluxes in the '(aperture)' row)",
        "sep": f"Background bw=bh={box} fw=fh=3; extract thresh {DETECT_SNR:g} with err = munc x "
        f"{scale:.3f} (matched-filter noise calibration), filter_type matched, Gaussian kernel "
        f"FWHM {fwhm_px:.2f} px, minarea {MINAREA}, clean {CLEAN}, "
        f"pixel stack {max(300_000, img0.size)} "
        f"(its default; 2,000,000 would add page faults, not compute); winpos centres; "
        f"sum_circle r {r_px:.2f} px exact, / EE {ee:.4f}",
    }

    sex = common.tool_path("source-extractor") or common.tool_path("sex")
    version = "not installed"
    if sex is None:
        notes.append("source-extractor not found on PATH: SExtractor column skipped")
    else:
        tmp = None
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="skybus-sex-")
            workdir = Path(tmp.name)
        workdir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sex, "-v"], capture_output=True, text=True, check=False)
        version = (r.stdout or r.stderr).strip().splitlines()[0]
        # Inputs written before timing: image (0 where invalid), calibrated RMS map (huge
        # where invalid: above WEIGHT_THRESH, so ignored), filter, parameter list.
        hdr = fits.Header()
        for k in ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2",
                  "CD2_1", "CD2_2", "CUNIT1", "CUNIT2", "RADESYS"):
            hdr[k] = header[k]
        fits.PrimaryHDU(img0.astype(np.float32), hdr).writeto(workdir / "maic.fits",
                                                              overwrite=True)
        rmsmap = np.where(valid, unc * scale, 1e10).astype(np.float32)
        fits.PrimaryHDU(rmsmap, hdr).writeto(workdir / "munc_rms.fits", overwrite=True)
        (workdir / "gauss.conv").write_text(_gauss_conv(fwhm_px))
        (workdir / "sex.param").write_text(
            "NUMBER\nX_IMAGE\nY_IMAGE\nXWIN_IMAGE\nYWIN_IMAGE\nFLUX_APER\nFLUXERR_APER\nFLAGS\n")
        thresh = _sep_threshold_equiv(fwhm_px)
        opts = {
            "CATALOG_NAME": str(workdir / "cat.fits"), "CATALOG_TYPE": "FITS_1.0",
            "PARAMETERS_NAME": str(workdir / "sex.param"), "DETECT_TYPE": "CCD",
            "DETECT_MINAREA": str(MINAREA), "DETECT_THRESH": f"{thresh:.4f}",
            "ANALYSIS_THRESH": f"{thresh:.4f}", "THRESH_TYPE": "RELATIVE",
            "FILTER": "Y", "FILTER_NAME": str(workdir / "gauss.conv"),
            "DEBLEND_NTHRESH": "32", "DEBLEND_MINCONT": "0.005", "CLEAN": "Y" if CLEAN else "N",
            "MASK_TYPE": "CORRECT", "PHOT_APERTURES": f"{2.0 * r_px:.4f}",
            "SATUR_LEVEL": "1e9", "MAG_ZEROPOINT": "0.0", "GAIN": "0.0", "PIXEL_SCALE": "0",
            "SEEING_FWHM": f"{common.FWHM_ARCSEC}", "BACK_TYPE": "AUTO",
            "BACK_SIZE": str(box), "BACK_FILTERSIZE": "3", "BACKPHOTO_TYPE": "GLOBAL",
            "WEIGHT_TYPE": "MAP_RMS", "WEIGHT_IMAGE": str(workdir / "munc_rms.fits"),
            "WEIGHT_THRESH": "1e9", "WEIGHT_GAIN": "N", "CHECKIMAGE_TYPE": "NONE",
            "VERBOSE_TYPE": "QUIET", "WRITE_XML": "N",
        }
        cmd = [sex, str(workdir / "maic.fits"), "-c", "/dev/null"]
        for k, v in opts.items():
            cmd += [f"-{k}", v]

        def run_sex() -> None:
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"source-extractor failed: {p.stderr[-2000:]}")

        timings["SExtractor"] = common.time_runs(run_sex, runs)
        cat = Table.read(workdir / "cat.fits", hdu=1 if _is_fits1(workdir / "cat.fits") else 2)
        fa = np.asarray(cat["FLUX_APER"], float).reshape(len(cat), -1)[:, 0]
        fe = np.asarray(cat["FLUXERR_APER"], float).reshape(len(cat), -1)[:, 0]
        cats["SExtractor"] = Catalogue(np.asarray(cat["XWIN_IMAGE"], float) - 1.0,
                                       np.asarray(cat["YWIN_IMAGE"], float) - 1.0,
                                       fa * ujy_per_pix / ee, fa / fe)
        say(f"SExtractor: median {timings['SExtractor'].median_s:.3f} s, {len(cat)} sources")
        config["SExtractor"] = (
            f"DETECT_THRESH {thresh:.3f} (= matched-filter S/N {DETECT_SNR:g}), FILTER gauss "
            f"FWHM {fwhm_px:.2f} px, DETECT_MINAREA {MINAREA}, CLEAN {'Y' if CLEAN else 'N'}, "
            f"BACK_SIZE {box} "
            f"BACK_FILTERSIZE 3, WEIGHT_TYPE MAP_RMS (munc x {scale:.3f}, as sep), "
            f"PHOT_APERTURES {2 * r_px:.2f} px (XWIN centres), SATUR_LEVEL 1e9, / EE {ee:.4f}")
        if tmp is not None:
            tmp.cleanup()

    back = bkg0.back()
    accuracy = {k: _accuracy(c, mosaic, truth, unc, valid, back, scale) for k, c in cats.items()}
    notes.append(f"Noise calibration (matched-filter S/N RMS on truth-source-free pixels): "
                 f"munc x {scale:.3f}; skybus measured UNCSCALE {t.meta['UNCSCALE']:.3f} itself.")
    return ExtractBenchResult(shape=mosaic.image.shape, timings=timings, accuracy=accuracy,
                              config=config, sextractor_version=version, notes=notes,
                              skybus_phases=sky_phases, skybus_profile_total_s=sky_total,
                              skybus_profile_calls=profile_calls,
                              sep_phases=sep_phases, paired_sep_s=paired)


def _per_coverage_error(sub: np.ndarray, unc: np.ndarray, cov: np.ndarray, valid: np.ndarray,
                        free: np.ndarray, *, fwhm_px: float) -> tuple[np.ndarray, list[float]]:
    """munc x the matched-filter noise calibration (robust RMS of the S/N map on source-free
    pixels) of each coverage decile: an error map calibrated locally, and the factors."""
    snr, _ = common.matched_filter_snr(sub, unc, valid, fwhm_px=fwhm_px)
    edges = np.unique(np.quantile(cov[valid], np.linspace(0.0, 1.0, 11)))
    decile = np.clip(np.searchsorted(edges, cov, side="right") - 1, 0, edges.size - 2)
    factors = []
    for k in range(edges.size - 1):
        quiet = snr[valid & free & (decile == k)]
        factors.append(common.robust_std(quiet) if quiet.size > 50 else float("nan"))
    fac = np.asarray(factors)
    fac = np.where(np.isfinite(fac), fac, np.nanmedian(fac))
    return np.where(valid, unc * fac[decile], 1e30), [float(f) for f in fac]


def _is_fits1(path: Path) -> bool:
    with fits.open(path) as h:
        return len(h) == 2


def _accuracy(cat: Catalogue, mosaic: Mosaic, truth: Table, unc: np.ndarray,
              valid: np.ndarray, bkg_map: np.ndarray, noise_scale: float) -> ExtractAccuracy:
    """Completeness, spurious fraction, flux ratios and astrometry of one catalogue."""
    from scipy import ndimage

    wcs = WCS(mosaic.header)
    pix = mosaic.pixel_arcsec
    fwhm_px = common.FWHM_ARCSEC / pix
    ra, dec = np.asarray(truth["ra"], float), np.asarray(truth["dec"], float)
    flux = np.asarray(truth["flux_24_ujy"], float)
    tx, ty = wcs.all_world2pix(ra, dec, 0)
    ny, nx = mosaic.image.shape
    margin = 2.0 * fwhm_px
    cov = np.nan_to_num(mosaic.coverage)
    good_map = ndimage.minimum_filter(valid & (cov >= 0.5 * np.median(cov[cov > 0])),
                                      size=int(2 * margin) + 1)
    ix = np.clip(np.rint(tx).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(ty).astype(int), 0, ny - 1)
    inside = (tx > margin) & (tx < nx - 1 - margin) & (ty > margin) & (ty < ny - 1 - margin)
    inside &= good_map[iy, ix]
    # Expected S/N of a PSF fit: flux x sqrt(sum P^2 / unc^2) / calibration, the noise of the
    # matched filter measured on the image (the same figure every side's threshold targets).
    sub = np.where(valid, mosaic.image - bkg_map, 0.0)
    scale = noise_scale
    _, den = common.matched_filter_snr(sub, unc, valid, fwhm_px=fwhm_px)
    snr_exp = flux / common.BAND.ujy_per_mjysr(pix) * np.sqrt(den[iy, ix]) / scale
    txy = np.column_stack([tx, ty])
    mxy = np.column_stack([cat.x, cat.y])
    radius = 3.0 / pix
    idx, _ = common.match_nearest(txy, mxy, radius)
    sel10 = inside & (snr_exp >= 10.0)
    completeness = float(np.mean(idx[sel10] >= 0)) if sel10.any() else float("nan")
    # Spurious: S/N >= 10 detections inside the good area with no truth source within 3".
    mix = np.clip(np.rint(cat.x).astype(int), 0, nx - 1)
    miy = np.clip(np.rint(cat.y).astype(int), 0, ny - 1)
    det_in = good_map[miy, mix] & np.isfinite(cat.snr) & (cat.snr >= 10.0)
    back, _ = common.match_nearest(mxy[det_in], txy, radius)
    spurious = float(np.mean(back < 0)) if det_in.any() else float("nan")
    iso = common.isolated(txy, flux, radius=4.0 * fwhm_px, max_ratio=0.1)
    bright = inside & iso & (snr_exp >= 50.0) & (idx >= 0)
    j = idx[bright]
    ratio = cat.flux_ujy[j] / flux[bright]
    mra, mdec = wcs.all_pix2world(cat.x[j], cat.y[j], 0)
    dx, dy = common.sky_offsets_arcsec(mra, mdec, ra[bright], dec[bright])
    return ExtractAccuracy(
        n_detected=int(cat.x.size), completeness_snr10=completeness, n_truth_snr10=int(sel10.sum()),
        spurious_frac=spurious, n_bright=int(bright.sum()),
        flux_ratio_median=float(np.median(ratio)) if ratio.size else float("nan"),
        flux_ratio_scatter=common.robust_std(ratio),
        astrom_rms_arcsec=float(np.sqrt(np.mean(dx**2 + dy**2))) if dx.size else float("nan"),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> ExtractBenchResult:
    from services.mosaic.coadd import build_mosaic

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args(argv)
    data = common.load_or_make_bcds(common.aor_config(args.quick))
    mosaic = build_mosaic(data.frames)
    truth = data.truth
    del data  # the frames released before timing (bench.__main__.FRESH_HEAP_NOTE)
    res = run(mosaic, truth, runs=args.runs or (1 if args.quick else 3))
    common.print_summary(res.accuracy, res.ratio)
    return res


if __name__ == "__main__":
    main()
