"""Benchmark: skybus `build_mosaic` against SWarp on the same calibrated MIPS 24 um BCDs.

Run: python -m bench.mosaic_vs_swarp [--quick] [--runs N]. SWarp is configured fairly (see
`SWARP_CONFIG`): SIP converted to TPV `.head` files, no flux rescaling, no background
subtraction, weights 1/bunc^2 with fatal-masked pixels at 0, skybus's output grid. Both sides
get the same frames (DCENUM 0 dropped: skybus by default, SWarp by not being given them).
Accuracy of each mosaic is measured by the same code against the simulator's truth.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import math
import pstats
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from bench import common
from services.mosaic.coadd import Mosaic, build_mosaic
from shared.instruments import mips
from simulator import sky as skymod

#: SWarp parameters besides the per-run COMBINE_TYPE (everything else is SWarp's default:
#: RESAMPLING_TYPE LANCZOS3, NTHREADS 0 = all cores).
SWARP_CONFIG: dict[str, str] = {
    "FSCALASTRO_TYPE": "NONE",  # MJy/sr in, MJy/sr out: no pixel-area flux rescaling
    "SUBTRACT_BACK": "N",  # skybus matches overlaps instead; neither side removes the sky
    "WEIGHT_TYPE": "MAP_WEIGHT",  # 1/bunc^2, fatal-masked pixels 0
    "WEIGHT_SUFFIX": ".weight.fits",
    "RESCALE_WEIGHTS": "N",  # bunc is calibrated: absolute weights, as skybus trusts bunc
    "HEADER_SUFFIX": ".head",  # per-frame TPV astrometry; coadd.head = skybus's output grid
    "BLANK_BADPIXELS": "Y",  # NaN where no frame contributes, as skybus
    "RESAMPLE": "Y",
    "DELETE_TMPFILES": "Y",
    "WRITE_XML": "N",
    "VERBOSE_TYPE": "QUIET",
    "CELESTIAL_TYPE": "NATIVE",
}

#: Phases of build_mosaic (function names in services/mosaic) for the time breakdown.
_PHASES = (
    ("_empirical_noise", "frame checks (unc vs measured noise)"),
    ("output_grid", "output grid"),
    ("map_frames", "map frames to the grid (SIP, overlaps)"),
    ("match_backgrounds", "background matching"),
    ("find_outliers", "outlier rejection"),
    ("drizzle", "drizzle coadd"),
)


@dataclass
class MosaicAccuracy:
    """Accuracy of one mosaic against truth (fluxes: aperture / (truth x encircled energy))."""

    n_sources: int
    flux_ratio_median: float
    flux_ratio_scatter: float  #: robust std of the ratio
    astrom_rms_arcsec: float  #: RMS radial offset of windowed centroids from truth
    astrom_bias_arcsec: float  #: |mean offset vector|
    bkg_offset_mjysr: float  #: median of (mosaic - truth background) on source-free pixels
    bkg_noise_mjysr: float  #: robust pixel RMS of the same
    bkg_large_rms_mjysr: float  #: RMS of 16x16-pixel block medians (large-scale residuals)


@dataclass
class MosaicBenchResult:
    n_frames: int
    n_frames_used: int
    shape: tuple[int, int]
    pixel_arcsec: float
    timings: dict[str, common.Timing[object]]
    accuracy: dict[str, MosaicAccuracy]
    breakdown: list[tuple[str, float]]  #: (phase, seconds under cProfile)
    profile_total_s: float
    top_functions: list[tuple[str, float]]
    mosaic: Mosaic
    n_outliers: int
    swarp_version: str
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> dict[str, float]:
        """skybus (in memory) / SWarp median time, per SWarp combine type."""
        sky = self.timings["skybus"].median_s
        return {k: sky / t.median_s for k, t in self.timings.items() if k.startswith("SWarp")}


# --- SWarp ---------------------------------------------------------------------------------


def _head_text(header: fits.Header) -> str:
    """A SWarp `.head` file: 80-column cards, one a line, END last."""
    return "\n".join(c.image for c in header.cards) + "\nEND\n"


def tpv_head(bcd_header: fits.Header) -> str:
    """The TPV `.head` of a TAN-SIP BCD header (SWarp ignores SIP: sip_tpv converts it)."""
    from sip_tpv import sip_to_pv

    keep = ("WCSAXES", "CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1",
            "CD1_2", "CD2_1", "CD2_2", "CUNIT1", "CUNIT2", "RADESYS", "EQUINOX")
    h = fits.Header()
    for k in keep:
        if k in bcd_header:
            h[k] = bcd_header[k]
    for k, v in bcd_header.items():
        if k.startswith(("A_", "B_", "AP_", "BP_")):
            h[k] = v
    sip_to_pv(h)
    out = fits.Header()
    for k, v in h.items():
        if not k.startswith(("A_", "B_", "AP_", "BP_")):
            out[k] = v
    return _head_text(out)


def prepare_swarp(files: list[common.BcdFiles], workdir: Path, grid_header: fits.Header) -> Path:
    """Write SWarp's inputs (before any timing): symlinks to the BCDs, TPV `.head`s, weight maps
    1/bunc^2 (0 where bbmsk has a fatal bit or unc is not positive), the coadd `.head` and the
    image list. Returns the list file."""
    indir = workdir / "in"
    indir.mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        stem = f.bcd.name.removesuffix(".fits")
        link = indir / f.bcd.name
        if not link.exists():
            link.symlink_to(f.bcd)
        with fits.open(f.bcd) as b, fits.open(f.bunc) as u, fits.open(f.bbmsk) as m:
            (indir / f"{stem}.head").write_text(tpv_head(b[0].header))
            unc = np.asarray(u[0].data, dtype=np.float64)
            bad = (np.asarray(m[0].data).astype(np.int64) & mips.FATAL_BITS) != 0
            ok = np.isfinite(unc) & (unc > 0) & ~bad & np.isfinite(b[0].data)
            w = np.where(ok, 1.0 / np.where(ok, unc, 1.0) ** 2, 0.0).astype(np.float32)
        fits.PrimaryHDU(w).writeto(indir / f"{stem}.weight.fits", overwrite=True)
        names.append(str(link))
    out_head = fits.Header()
    for k in ("NAXIS", "NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1",
              "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "CUNIT1", "CUNIT2", "RADESYS"):
        out_head[k] = grid_header[k]
    out_head["EQUINOX"] = 2000.0
    (workdir / "coadd.head").write_text(_head_text(out_head))
    lst = workdir / "images.lst"
    lst.write_text("\n".join(names) + "\n")
    return lst


def swarp_command(swarp: str, lst: Path, workdir: Path, combine: str) -> list[str]:
    cmd = [swarp, f"@{lst}", "-c", str(workdir / "default.swarp"),
           "-IMAGEOUT_NAME", str(workdir / "coadd.fits"),
           "-WEIGHTOUT_NAME", str(workdir / "coadd.weight.fits"),
           "-RESAMPLE_DIR", str(workdir / "resamp"), "-COMBINE_TYPE", combine]
    for k, v in SWARP_CONFIG.items():
        cmd += [f"-{k}", v]
    return cmd


def run_swarp(cmd: list[str]) -> None:
    """One SWarp run (raises with SWarp's stderr on failure)."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"SWarp failed ({r.returncode}): {r.stderr[-2000:]}")


def swarp_version(swarp: str) -> str:
    r = subprocess.run([swarp, "-v"], capture_output=True, text=True, check=False)
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


# --- accuracy --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Truth:
    """Truth sources on the mosaic grid and the truth background there."""

    x: np.ndarray
    y: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    flux_ujy: np.ndarray
    bright: np.ndarray  #: bright isolated sources well inside full coverage
    bkg_mjysr: np.ndarray  #: truth background at every mosaic pixel
    source_free: np.ndarray  #: pixels far from sources with good coverage


def _truth_on_grid(data: common.BenchBCDs, mosaic: Mosaic, *, bright_ujy: float) -> _Truth:
    wcs = WCS(mosaic.header)
    t = data.truth
    ra, dec = np.asarray(t["ra"], float), np.asarray(t["dec"], float)
    flux = np.asarray(t["flux_24_ujy"], float)
    x, y = wcs.all_world2pix(ra, dec, 0)
    ny, nx = mosaic.image.shape
    fwhm_px = common.FWHM_ARCSEC / mosaic.pixel_arcsec
    cov = np.nan_to_num(mosaic.coverage)
    full = cov >= 0.5 * np.median(cov[cov > 0])
    margin = math.ceil(5.5 * fwhm_px)
    inside = (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    xy = np.column_stack([x, y])
    iso = common.isolated(xy, flux, radius=5.0 * fwhm_px, max_ratio=0.05)
    bright = inside & full[iy, ix] & iso & (flux >= bright_ujy)
    yy, xx = np.mgrid[0:ny, 0:nx]
    pra, pdec = wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    bkg = data.sky.background_mjysr(1, pra, pdec).reshape(ny, nx)
    from scipy.spatial import cKDTree

    pix = np.column_stack([xx.ravel(), yy.ravel()])
    far = np.ones(pix.shape[0], dtype=bool)
    for sel, r in ((flux >= 500.0, 5.0 * fwhm_px), (flux < 500.0, 2.5 * fwhm_px)):
        if np.any(sel):
            d, _ = cKDTree(xy[sel]).query(pix, k=1)
            far &= d > r
    source_free = far.reshape(ny, nx) & full
    return _Truth(x, y, ra, dec, flux, bright, bkg, source_free)


def measure(image: np.ndarray, wcs: WCS, truth: _Truth, pixel_arcsec: float) -> MosaicAccuracy:
    """Flux, astrometry and background residuals of one mosaic (same code for every side)."""
    fwhm_px = common.FWHM_ARCSEC / pixel_arcsec
    sel = truth.bright
    x, y = truth.x[sel], truth.y[sel]
    r_as = 2.0 * common.FWHM_ARCSEC
    ee = skymod.gaussian_encircled_energy(r_as, common.FWHM_ARCSEC)
    ap = common.annulus_aperture_flux(image, x, y, r_px=r_as / pixel_arcsec,
                                      ann_px=(3.0 * fwhm_px, 5.0 * fwhm_px))
    flux = ap * mips.BANDS[1].ujy_per_mjysr(pixel_arcsec)
    ratio = flux / (truth.flux_ujy[sel] * ee)
    cx, cy = common.windowed_centroids(image, x, y, fwhm_px=fwhm_px)
    ra, dec = wcs.all_pix2world(cx, cy, 0)
    dx, dy = common.sky_offsets_arcsec(ra, dec, truth.ra[sel], truth.dec[sel])
    ok = np.isfinite(dx) & np.isfinite(dy)
    res = (image - truth.bkg_mjysr)[truth.source_free & np.isfinite(image)]
    resid = np.where(truth.source_free & np.isfinite(image), image - truth.bkg_mjysr, np.nan)
    b = 16
    ny, nx = (s - s % b for s in resid.shape)
    blocks = (resid[:ny, :nx].reshape(ny // b, b, nx // b, b).transpose(0, 2, 1, 3)
              .reshape(ny // b, nx // b, b * b))
    nvalid = np.sum(np.isfinite(blocks), axis=2)
    with np.errstate(all="ignore"):
        meds = np.nanmedian(np.where(nvalid[..., None] >= b * b // 4, blocks, np.nan), axis=2)
    meds = meds[np.isfinite(meds)]
    return MosaicAccuracy(
        n_sources=int(sel.sum()),
        flux_ratio_median=float(np.nanmedian(ratio)) if ratio.size else float("nan"),
        flux_ratio_scatter=common.robust_std(ratio),
        astrom_rms_arcsec=float(np.sqrt(np.mean(dx[ok] ** 2 + dy[ok] ** 2))) if ok.any()
        else float("nan"),
        astrom_bias_arcsec=float(np.hypot(np.mean(dx[ok]), np.mean(dy[ok]))) if ok.any()
        else float("nan"),
        bkg_offset_mjysr=float(np.median(res)) if res.size else float("nan"),
        bkg_noise_mjysr=common.robust_std(res),
        bkg_large_rms_mjysr=float(np.std(meds - np.median(meds))) if meds.size > 1
        else float("nan"),
    )


# --- where skybus's time goes ------------------------------------------------------------------


def profile_build_mosaic(
    frames: list,
) -> tuple[list[tuple[str, float]], float, list[tuple[str, float]]]:
    """cProfile one build_mosaic: (phase, cumulative s) for the known phases, the total, and
    the top functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    build_mosaic(frames)
    prof.disable()
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    total = 0.0
    phases: list[tuple[str, float]] = []
    for (file, _line, fn), (_cc, _nc, _tt, ct, _callers) in raw.items():
        if fn == "build_mosaic" and "services/mosaic" in file:
            total = ct
    for fname, label in _PHASES:
        ct = sum(v[3] for (f, _l, fn), v in raw.items() if fn == fname and "services/mosaic" in f)
        phases.append((label, ct))
    rest = max(0.0, total - sum(p[1] for p in phases))
    phases.append(("other (checks, weights, result maps)", rest))
    top = sorted(((f"{Path(f).parent.name}/{Path(f).name}:{fn}" if f != "~" else fn, v[2])
                  for (f, _l, fn), v in raw.items()), key=lambda kv: -kv[1])[:8]
    return phases, total, top


# --- the benchmark ----------------------------------------------------------------------------


def run(data: common.BenchBCDs, *, runs: int = 3, workdir: Path | None = None,
        combine_types: tuple[str, ...] = ("WEIGHTED", "CLIPPED"),
        log: object = print) -> MosaicBenchResult:
    """Time and measure skybus and SWarp on `data`; SWarp sides are skipped when SWarp is
    missing. `workdir` (default: a temporary directory) receives SWarp's inputs and outputs."""
    say = log if callable(log) else print
    swarp = common.tool_path("SWarp") or common.tool_path("swarp")
    frames = data.frames
    used_files = [f for f in data.files if f.dcenum != 0]
    timings: dict[str, common.Timing[object]] = {}
    notes: list[str] = []

    timings["skybus"] = common.time_runs(lambda: build_mosaic(frames), runs)
    mosaic = timings["skybus"].result
    assert isinstance(mosaic, Mosaic)
    say(f"skybus build_mosaic (in memory, {len(frames)} frames): "
        f"median {timings['skybus'].median_s:.2f} s")

    def with_reading() -> Mosaic:
        return build_mosaic([common.read_frame(f) for f in used_files])

    timings["skybus+read"] = common.time_runs(with_reading, runs)
    say(f"skybus incl. FITS reading ({len(used_files)} x bcd+bunc+bbmsk): "
        f"median {timings['skybus+read'].median_s:.2f} s")

    truth = _truth_on_grid(data, mosaic, bright_ujy=1000.0)
    accuracy = {"skybus": measure(mosaic.image, WCS(mosaic.header), truth, mosaic.pixel_arcsec)}

    version = "not installed"
    tmp = None
    if swarp is None:
        notes.append("SWarp not found on PATH: SWarp columns skipped")
    else:
        version = swarp_version(swarp)
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="skybus-swarp-")
            workdir = Path(tmp.name)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "resamp").mkdir(exist_ok=True)
        conf = subprocess.run([swarp, "-d"], capture_output=True, text=True, check=True).stdout
        (workdir / "default.swarp").write_text(conf)
        lst = prepare_swarp(used_files, workdir, mosaic.header)
        for combine in combine_types:
            cmd = swarp_command(swarp, lst, workdir, combine)
            key = f"SWarp {combine}"
            timings[key] = common.time_runs(functools.partial(run_swarp, cmd), runs)
            with fits.open(workdir / "coadd.fits") as h, \
                    fits.open(workdir / "coadd.weight.fits") as hw:
                img = np.asarray(h[0].data, dtype=np.float64)
                wcs = WCS(h[0].header)
                wout = np.asarray(hw[0].data, dtype=np.float64)
            # Zero output weight = no data (SWarp writes 0 there despite BLANK_BADPIXELS).
            img = np.where(wout > 0, img, np.nan)
            covered = np.nan_to_num(mosaic.coverage) >= 1.0
            holes = float(np.mean(wout[covered] <= 0)) if covered.any() else float("nan")
            notes.append(f"{key}: {100 * holes:.2f} % of the pixels skybus covers with >= 1 "
                         "frame have zero SWarp weight (masked pixels grown by the LANCZOS3 "
                         "kernel); treated as NaN")
            if img.shape != mosaic.image.shape:
                notes.append(f"{key}: output shape {img.shape} != skybus {mosaic.image.shape}")
            accuracy[key] = measure(img, wcs, truth, mosaic.pixel_arcsec)
            say(f"{key}: median {timings[key].median_s:.2f} s")
        if tmp is not None:
            tmp.cleanup()

    phases, total, top = profile_build_mosaic(frames)
    return MosaicBenchResult(
        n_frames=len(frames), n_frames_used=mosaic.n_frames_used, shape=mosaic.image.shape,
        pixel_arcsec=mosaic.pixel_arcsec, timings=timings, accuracy=accuracy, breakdown=phases,
        profile_total_s=total, top_functions=top, mosaic=mosaic, n_outliers=mosaic.n_outliers,
        swarp_version=version, notes=notes,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> MosaicBenchResult:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="16 DCEs, 1 run")
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args(argv)
    data = common.load_or_make_bcds(common.aor_config(args.quick))
    res = run(data, runs=args.runs or (1 if args.quick else 3))
    common.print_summary(res.accuracy, res.ratio)
    return res


if __name__ == "__main__":
    main()
