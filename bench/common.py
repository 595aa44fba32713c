"""Shared pieces of the peer benchmarks: the cached simulated BCD set, timing, truth matching.

The BCDs are simulated (`simulator.mips`) and calibrated (`calibrate_mips24_dce`) once and cached
under `bench/out/` (gitignored), keyed by the AOR configuration and the source of the simulator
and calibrate code, so that `python -m bench` spends its time on the benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from astropy.io import fits
from astropy.table import Table

from shared.bcd import BCDFrame
from shared.instruments import mips
from simulator import mips as simmips
from simulator import sky as skymod

T = TypeVar("T")

#: Cached inputs and scratch space (gitignored).
OUT_DIR = Path(__file__).resolve().parent / "out"
_REPO = Path(__file__).resolve().parent.parent
#: Code whose change invalidates the cached BCDs.
_CACHE_SOURCES = ("simulator", "services/calibrate/mips", "shared/instruments/mips.py")

BAND = mips.BANDS[1]
FWHM_ARCSEC = BAND.psf_fwhm_arcsec


@dataclass(frozen=True, slots=True)
class Timing(Generic[T]):
    """Wall times (s) of repeated runs, their median, and the last run's result."""

    runs_s: tuple[float, ...]
    result: T

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


def time_runs(fn: Callable[[], T], runs: int) -> Timing[T]:
    """Run `fn` `runs` times (>= 1) and time each call with `time.perf_counter`."""
    times = []
    result: T | None = None
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times), result)  # type: ignore[arg-type]


def print_summary(accuracy: Mapping[str, object], ratio: Mapping[str, float]) -> None:
    """A bench module's command-line summary: each side's accuracy, then skybus / side."""
    for k, a in accuracy.items():
        print(f"{k:18s} {a}")
    for k, r in ratio.items():
        print(f"skybus / {k}: {r:.2f}")


def tool_path(name: str) -> str | None:
    """Absolute path of an executable on PATH, or None."""
    return shutil.which(name)


def aor_config(quick: bool, *, psf: str = "gaussian") -> simmips.MipsAORConfig:
    """The benchmark AOR: 24 um only. Full: a 4x4 raster (100" steps) x 13 dithers = 208 DCEs
    (192 after DCENUM 0 is dropped) over ~12'x12', 450 sources. Quick: 2x2 x 4 = 16 DCEs.
    `psf`: the simulator's optics, "gaussian" (the band's FWHM) or "airy" (the telescope's
    diffraction pattern, the PSF real MIPS data have)."""
    if quick:
        raster = tuple((x, y) for y in (-40.0, 40.0) for x in (-40.0, 40.0))
        return simmips.MipsAORConfig(
            aorkey=16180339, channels=(1,), raster_24=raster, n_dither_24=4, n_sources=80,
            sky_half_arcsec=200.0, exptime_24_s=3.0, count_slope=0.7, flux_24_min_ujy=70.0,
            psf=psf,
        )  # fmt: skip
    steps = (-150.0, -50.0, 50.0, 150.0)
    raster = tuple((x, y) for y in steps for x in steps)
    return simmips.MipsAORConfig(
        aorkey=27182818, channels=(1,), raster_24=raster, n_dither_24=13, n_sources=450,
        sky_half_arcsec=360.0, exptime_24_s=10.0, count_slope=0.7, flux_24_min_ujy=70.0,
        psf=psf,
    )  # fmt: skip


def airy_encircled_energy(radius_arcsec: float, cfg: simmips.MipsAORConfig,
                          pixel_arcsec: float) -> float:
    """Fraction of the flux of `cfg`'s simulated 24 um diffraction pattern within
    `radius_arcsec` on a mosaic of `pixel_arcsec` pixels (the pattern convolved with the
    pixel box, as an aperture on the mosaic sees it): the peers' aperture correction on the
    diffraction-limited mosaic, from the simulator's own PSF (numerically, 41 samples per
    pixel: the box is centred on a sample)."""
    from scipy.ndimage import uniform_filter

    step = pixel_arcsec / 41.0
    half = math.ceil((radius_arcsec + pixel_arcsec) / step)
    r = np.arange(-half, half + 1) * step
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    pattern = skymod.airy_per_arcsec2(r2, lambda_over_d_arcsec=BAND.lambda_over_d_arcsec,
                                      obscuration=cfg.airy_obscuration)
    seen = uniform_filter(pattern, size=41, mode="constant")
    return float(np.sum(seen[r2 <= radius_arcsec**2]) * step * step)


@dataclass(frozen=True, slots=True)
class BcdFiles:
    """The three files of one BCD on disk."""

    bcd: Path
    bunc: Path
    bbmsk: Path
    dcenum: int


@dataclass
class BenchBCDs:
    """A calibrated 24 um BCD set on disk and in memory, with the sky it was simulated from."""

    config: simmips.MipsAORConfig
    directory: Path
    files: list[BcdFiles]
    frames: list[BCDFrame]
    sky: skymod.Sky

    @property
    def truth(self) -> Table:
        return self.sky.sources


def _cache_key(cfg: simmips.MipsAORConfig) -> str:
    h = hashlib.sha256(repr(dataclasses.astuple(cfg)).encode())
    for rel in _CACHE_SOURCES:
        p = _REPO / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def sky_of(cfg: simmips.MipsAORConfig) -> skymod.Sky:
    """The sky `simulate_aor(cfg)` observes (same seed and parameters)."""
    return skymod.make_sky(
        ra_deg=cfg.ra_deg, dec_deg=cfg.dec_deg, half_size_arcsec=cfg.sky_half_arcsec,
        n_sources=cfg.n_sources, flux_24_min_ujy=cfg.flux_24_min_ujy,
        flux_24_max_ujy=cfg.flux_24_max_ujy, seed=cfg.seed + 1, count_slope=cfg.count_slope,
    )  # fmt: skip


def read_frame(f: BcdFiles) -> BCDFrame:
    """One BCDFrame from its bcd/bunc/bbmsk files (pixels read, not memory-mapped)."""
    with (
        fits.open(f.bcd, memmap=False) as b,
        fits.open(f.bunc, memmap=False) as u,
        fits.open(f.bbmsk, memmap=False) as m,
    ):
        return BCDFrame.from_hdus(b, u, m, key=f.bcd.name)


def load_or_make_bcds(
    cfg: simmips.MipsAORConfig, out_dir: Path = OUT_DIR, *, log: Callable[[str], None] = print
) -> BenchBCDs:
    """Simulate + calibrate the AOR's 24 um DCEs into `out_dir/bcd_<key>/`, or reuse them."""
    from services.calibrate.mips.calfiles import MipsCalibration
    from services.calibrate.mips.pipeline import calibrate_mips24_dce

    directory = out_dir / f"bcd_{cfg.aorkey}_{_cache_key(cfg)}"
    index = directory / "index.txt"
    if not index.exists():
        t0 = time.perf_counter()
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sim = simmips.simulate_aor(cfg)
        cal = MipsCalibration.from_hdus(sim.calibration)
        lines = []
        for raw in sim.raw_dces:
            p = calibrate_mips24_dce(raw, cal)
            for kind, hdul in (("bcd", p.bcd), ("bunc", p.bunc), ("bbmsk", p.mask)):
                hdul.writeto(tmp / p.names[kind], overwrite=True)
            lines.append(f"{p.names['bcd']} {p.names['bunc']} {p.names['bbmsk']} {p.dcenum}")
        sim.truth_sources.write(tmp / "truth_sources.fits", overwrite=True)
        (tmp / "index.txt").write_text("\n".join(lines) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        log(f"simulated + calibrated {len(lines)} BCDs in {time.perf_counter() - t0:.1f} s "
            f"-> {directory}")
    files = []
    for line in index.read_text().split("\n"):
        if line.strip():
            b, u, m, d = line.split()
            files.append(BcdFiles(directory / b, directory / u, directory / m, int(d)))
    frames = [read_frame(f) for f in files]
    return BenchBCDs(cfg, directory, files, frames, sky_of(cfg))


# --- measurement helpers (the same code measures every side) -------------------------------


def robust_std(x: np.ndarray) -> float:
    """1.4826 x median absolute deviation (NaN for an empty input)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def sky_offsets_arcsec(
    ra: np.ndarray, dec: np.ndarray, ra_ref: np.ndarray, dec_ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(dRA cos Dec, dDec) in arcsec of positions from reference positions (small offsets)."""
    dra = ((np.asarray(ra) - np.asarray(ra_ref) + 180.0) % 360.0 - 180.0) * np.cos(
        np.radians(np.asarray(dec_ref))
    )
    return dra * 3600.0, (np.asarray(dec) - np.asarray(dec_ref)) * 3600.0


def match_nearest(
    ref_xy: np.ndarray, meas_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each reference position, the index of the nearest measured position within
    `radius` (-1 where none) and its distance (inf where none)."""
    from scipy.spatial import cKDTree

    if len(meas_xy) == 0 or len(ref_xy) == 0:
        return np.full(len(ref_xy), -1), np.full(len(ref_xy), np.inf)
    d, i = cKDTree(meas_xy).query(ref_xy, k=1, distance_upper_bound=radius)
    i = np.where(np.isfinite(d), i, -1)
    return i.astype(int), d


def isolated(xy: np.ndarray, flux: np.ndarray, *, radius: float, max_ratio: float) -> np.ndarray:
    """True where no other source brighter than `max_ratio` x this one lies within `radius`."""
    from scipy.spatial import cKDTree

    ok = np.ones(len(xy), dtype=bool)
    tree = cKDTree(xy)
    for i, nbrs in enumerate(tree.query_ball_point(xy, r=radius)):
        others = [j for j in nbrs if j != i]
        if others and np.max(flux[others]) > max_ratio * flux[i]:
            ok[i] = False
    return ok


def windowed_centroids(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, *, fwhm_px: float, n_iter: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (0-based pixels) of sources near (x, y), after subtracting
    each stamp's annulus median (3..5 FWHM); NaN pixels count as background."""
    half = math.ceil(5.0 * fwhm_px)
    off = np.arange(-half, half + 1)
    x0 = np.rint(x).astype(int)
    y0 = np.rint(y).astype(int)
    ny, nx = image.shape
    iy = np.clip(y0[:, None, None] + off[None, :, None], 0, ny - 1)
    ix = np.clip(x0[:, None, None] + off[None, None, :], 0, nx - 1)
    stamps = image[iy, ix].astype(float)
    r0 = np.hypot(off[None, :, None] * 1.0, off[None, None, :] * 1.0)
    ann = (r0 >= 3.0 * fwhm_px) & (r0 <= 5.0 * fwhm_px)
    sky = np.nanmedian(np.where(ann, stamps, np.nan), axis=(1, 2))
    stamps = np.nan_to_num(stamps - sky[:, None, None], nan=0.0)
    gx = ix.astype(float)
    gy = iy.astype(float)
    sig = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    cx = np.asarray(x, dtype=float).copy()
    cy = np.asarray(y, dtype=float).copy()
    for _ in range(n_iter):
        w = np.exp(-((gx - cx[:, None, None]) ** 2 + (gy - cy[:, None, None]) ** 2) / (2 * sig**2))
        wi = w * stamps
        s = wi.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            # Factor 2: the Gaussian-window step of SExtractor's XWIN (converges for a Gaussian).
            cx = cx + 2.0 * (wi * (gx - cx[:, None, None])).sum(axis=(1, 2)) / s
            cy = cy + 2.0 * (wi * (gy - cy[:, None, None])).sum(axis=(1, 2)) / s
    return cx, cy


def annulus_aperture_flux(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, *, r_px: float, ann_px: tuple[float, float]
) -> np.ndarray:
    """Exact-overlap circular-aperture sums (image unit x pixel) minus the annulus mean x
    aperture area (sep.sum_circle, NaN pixels masked)."""
    import sep

    img = np.ascontiguousarray(image, dtype=np.float64)
    mask = ~np.isfinite(img)
    flux, _err, _flag = sep.sum_circle(
        np.where(mask, 0.0, img), np.asarray(x, float), np.asarray(y, float), r_px,
        mask=mask, bkgann=ann_px, subpix=0,
    )  # fmt: skip
    return np.asarray(flux, dtype=float)


def fmt(x: float, spec: str = ".3g") -> str:
    """A number for the tables ('-' for NaN/None)."""
    if x is None or not math.isfinite(x):
        return "-"
    return format(x, spec)


def matched_filter_snr(sub: np.ndarray, unc: np.ndarray, valid: np.ndarray, *,
                       fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
    """White-noise PSF-matched-filter S/N map of a background-subtracted image and the
    denominator sum(P^2 / unc^2) (unit-sum Gaussian P of `fwhm_px`) at every pixel."""
    from scipy import ndimage

    sig = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    w = np.where(valid, 1.0 / np.where(valid, unc, 1.0) ** 2, 0.0)
    num = ndimage.gaussian_filter(np.where(valid, sub, 0.0) * w, sig, mode="constant")
    den = ndimage.gaussian_filter(w, sig / math.sqrt(2.0), mode="constant") / (
        4.0 * math.pi * sig**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), 0.0)
    return snr, den


def noise_calibration(sub: np.ndarray, unc: np.ndarray, valid: np.ndarray, *,
                      fwhm_px: float, source_free: np.ndarray) -> float:
    """Factor by which `unc` underestimates the noise a point-source fit sees: the robust RMS
    of the matched-filter S/N map over `source_free` pixels (correlated mosaic noise makes it
    differ from a per-pixel RMS; a mesh RMS would include the sky gradient within the mesh)."""
    snr, _ = matched_filter_snr(sub, unc, valid, fwhm_px=fwhm_px)
    return robust_std(snr[valid & source_free])


def source_free_mask(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                     *, fwhm_px: float) -> np.ndarray:
    """Pixels farther than 4 FWHM from truth sources >= 500 uJy and 2 FWHM from fainter ones."""
    from scipy.spatial import cKDTree

    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    pix = np.column_stack([xx.ravel(), yy.ravel()])
    xy = np.column_stack([x, y])
    far = np.ones(pix.shape[0], dtype=bool)
    for sel, r in ((flux >= 500.0, 4.0 * fwhm_px), (flux < 500.0, 2.0 * fwhm_px)):
        if np.any(sel):
            d, _ = cKDTree(xy[sel]).query(pix, k=1)
            far &= d > r
    return far.reshape(ny, nx)
