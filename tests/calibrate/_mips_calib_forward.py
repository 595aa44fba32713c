"""A small seeded forward model of MIPS raw DCEs (the calibrate contract), for calibrate tests.

It implements the detector model of the raw-product contract independently of the simulator:
24 um rate = sky / FLUXCONV * flat * f_dce + dark, ramp with Poisson + read noise, cosmic-ray
jumps, clipping at SATLEVEL, on-board least-squares slope and first difference; Ge rate =
(sky / FLUXCONV + stim) * R(t) * flat + dark, whole ramps with jumps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from scipy.special import erf

from shared.instruments import mips

SLPSCALE = 256.0
READ_NOISE_DN = 8.0
GAIN = 5.0


def _gauss_pixel_image(
    shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, amps: np.ndarray, sigma_px: float
) -> np.ndarray:
    """Sum of pixel-integrated Gaussians; `amps` is the total (sum over pixels) of each."""
    ny, nx = shape
    edges_x = np.arange(nx + 1) - 0.5
    edges_y = np.arange(ny + 1) - 0.5
    s = sigma_px * np.sqrt(2.0)
    fx = np.diff(0.5 * erf((edges_x[None, :] - xs[:, None]) / s), axis=1)  # (n, nx)
    fy = np.diff(0.5 * erf((edges_y[None, :] - ys[:, None]) / s), axis=1)  # (n, ny)
    return np.einsum("n,ny,nx->yx", amps, fy, fx)


def header(
    channel: int,
    expid: int,
    dcenum: int,
    exptime_s: float,
    nsamples: int,
    t_s: float,
    stim: bool = False,
    sat_level: float = 60000.0,
) -> fits.Header:
    h = fits.Header()
    h["TELESCOP"] = "Spitzer"
    h["INSTRUME"] = "MIPS"
    h["CHNLNUM"] = channel
    h["AORKEY"] = 12345678
    h["EXPID"] = expid
    h["DCENUM"] = dcenum
    h["AOT_TYPE"] = "MipsPhot"
    h["EXPTIME"] = exptime_s
    h["NSAMPLES"] = nsamples
    h["DATE_OBS"] = "2005-01-01T00:00:00.000"
    h["MJD_OBS"] = 53371.0 + t_s / 86400.0
    h["SCLK_OBS"] = 8.0e8 + t_s
    h["RA_REF"] = 150.0
    h["DEC_REF"] = 2.2
    h["PA_REF"] = 30.0
    h["SATLEVEL"] = sat_level
    h["STIMFLSH"] = stim
    h["NDCEGRP"] = 1
    h["BUNIT"] = "DN"
    return h


@dataclass
class Si24Case:
    raw: fits.HDUList
    truth_mjysr: np.ndarray
    truth_no_cr_rate: np.ndarray  # noiseless rate DN/s
    cr_mask: np.ndarray  # pixels hit by a cosmic ray
    cr_slope_bias_dn_s: np.ndarray  # slope change caused by the cosmic ray (DN/s)
    saturated: np.ndarray  # pixels whose ramp reached SATLEVEL
    calibration: list[fits.HDUList] = field(default_factory=list)


def calibration_24(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[fits.HDUList]]:
    shape = (128, 128)
    flat = 1.0 + 0.03 * rng.standard_normal(shape)
    flat /= np.median(flat)
    dark = 3.0 + 0.5 * rng.standard_normal(shape)
    pm = np.zeros(shape, dtype=np.int16)
    bad = rng.choice(flat.size, 20, replace=False)
    pm.flat[bad] = int(mips.MaskBit.PMASK)
    hdus = []
    for kind, data in (("DARK", dark), ("FLAT", flat), ("PMASK", pm)):
        h = fits.Header()
        h["CALTYPE"] = kind
        h["CHNLNUM"] = 1
        h["FILENAME"] = f"mips24_{kind.lower()}.fits"
        hdus.append(fits.HDUList([fits.PrimaryHDU(data=data.astype(data.dtype), header=h)]))
    return flat, dark, pm, hdus


def simulate_24(
    seed: int = 1,
    *,
    dcenum: int = 5,
    exptime_s: float = 10.0,
    n_cr: int = 40,
    n_sources: int = 25,
    n_saturating: int = 3,
    f_dce: float | None = None,
) -> Si24Case:
    """One 24 um DCE with sources, a few saturating, and `n_cr` cosmic-ray hits."""
    rng = np.random.default_rng(seed)
    shape = (128, 128)
    flat, dark, pm, cal = calibration_24(np.random.default_rng(1000))
    fc = mips.BANDS[1].fluxconv
    sigma_px = mips.BANDS[1].psf_fwhm_arcsec / mips.BANDS[1].pixel_arcsec / 2.3548
    xs = rng.uniform(8, 120, n_sources)
    ys = rng.uniform(8, 120, n_sources)
    # totals in MJy/sr x pixel: peak ~ 0.16 x total
    amps = 10 ** rng.uniform(1.0, 2.8, n_sources)
    amps[:n_saturating] = rng.uniform(6000, 15000, n_saturating)
    yy, xx = np.mgrid[0:128, 0:128]
    sky = 20.0 + 0.02 * (xx - 64) + 0.01 * (yy - 64)
    sky = sky + _gauss_pixel_image(shape, xs, ys, amps, sigma_px)
    if f_dce is None:
        f_dce = 1.0 - (0.12 if dcenum == 0 else 0.02 if dcenum in (1, 2) else 0.0)
    rate = sky / fc * flat * f_dce + dark
    rate[pm != 0] = 0.0  # dead
    dt = mips.SI_SAMPLE_S
    n = round(exptime_s / dt)
    sat = 60000.0
    # accumulate electrons with Poisson noise, sample by sample
    inc = rng.poisson(np.broadcast_to(rate * dt * GAIN, (n, *shape))) / GAIN
    cr_mask = np.zeros(shape, bool)
    cr_pix = rng.choice(np.flatnonzero(pm.ravel() == 0), n_cr, replace=False)
    cr_mask.flat[cr_pix] = True
    cr_sample = rng.integers(1, n, n_cr)
    cr_amp = 10 ** rng.uniform(1.7, 3.5, n_cr)  # DN
    jump = np.zeros((n, *shape))
    jump[cr_sample, cr_pix // 128, cr_pix % 128] = cr_amp
    counts = np.cumsum(inc + jump, axis=0)
    samples = np.minimum(counts, sat) + READ_NOISE_DN * rng.standard_normal((n, *shape))
    t = np.arange(n, dtype=float)
    tc = t - t.mean()
    slope = np.tensordot(tc, samples, axes=(0, 0)) / np.sum(tc**2)  # DN per sample
    diff = samples[1] - samples[0]
    # the slope change from the jump alone: sum_{k>=s} tc_k / sum tc^2 * amp / dt
    w_after = np.array([tc[s:].sum() for s in range(n)]) / np.sum(tc**2)
    bias = np.zeros(shape)
    bias.flat[cr_pix] = w_after[cr_sample] * cr_amp / dt
    cube = np.stack([np.round(slope * SLPSCALE), np.round(diff)]).astype(np.int32)
    h = header(1, 3, dcenum, exptime_s, n, 100.0)
    h["SLPSCALE"] = SLPSCALE
    h["RONOISE"] = READ_NOISE_DN
    h["GAIN"] = GAIN
    raw = fits.HDUList([fits.PrimaryHDU(data=cube, header=h)])
    saturated = rate * n * dt >= sat
    return Si24Case(raw, sky, rate, cr_mask, bias, saturated, cal)


def ge_responsivity(t_s: np.ndarray | float) -> np.ndarray:
    return 1.0 + 0.1 * np.sin(2 * np.pi * np.asarray(t_s) / 1500.0)


@dataclass
class GeCase:
    raws: list[fits.HDUList]
    truths: list[np.ndarray]  # per science DCE, MJy/sr
    science_keys: list[tuple[int, int]]  # (expid, dcenum)
    calibration: list[fits.HDUList]


def simulate_ge(
    seed: int = 2,
    *,
    n_dce: int = 26,
    stim_every: int = 8,
    exptime_s: float = 10.0,
    stim_level_iu: float = 0.2,
    cr_per_pixel_s: float = 1 / 35.0,
) -> GeCase:
    """One 70 um AOR group: dithered point sources on a background, stim every `stim_every`."""
    rng = np.random.default_rng(seed)
    shape = (32, 32)
    band = mips.BANDS[2]
    fc = band.fluxconv
    flat = 1.0 + 0.05 * rng.standard_normal(shape)
    flat /= np.median(flat)
    dark = 20.0 + 2.0 * rng.standard_normal(shape)
    pm = np.zeros(shape, dtype=np.int16)
    pm[16:, :] = mips.GE_PMASK_BAD_HALF
    cal = []
    for kind, data in (("DARK", dark), ("FLAT", flat), ("PMASK", pm), ("STIM", None)):
        h = fits.Header()
        h["CALTYPE"] = kind
        h["CHNLNUM"] = 2
        h["FILENAME"] = f"mips70_{kind.lower()}.fits"
        if kind == "STIM":
            h["STIMLVL"] = stim_level_iu
        cal.append(fits.HDUList([fits.PrimaryHDU(data=data, header=h)]))
    sigma_px = band.psf_fwhm_arcsec / band.pixel_arcsec / 2.3548
    n = int(exptime_s * mips.GE_SAMPLE_RATE_HZ)
    dt = 1.0 / mips.GE_SAMPLE_RATE_HZ
    raws, truths, keys = [], [], []
    xs0 = rng.uniform(4, 28, 6)
    ys0 = rng.uniform(2, 14, 6)
    amps = 10 ** rng.uniform(2.0, 3.0, 6)  # MJy/sr x px
    for i in range(n_dce):
        t = i * 12.0
        is_stim = i % stim_every == 0
        dx, dy = rng.uniform(-3, 3, 2)
        sky = 6.0 + _gauss_pixel_image(shape, xs0 + dx, ys0 + dy, amps, sigma_px)
        stim_iu = stim_level_iu if is_stim else 0.0
        r_t = float(ge_responsivity(t + exptime_s / 2))
        rate = (sky / fc + stim_iu) * r_t * flat * 1000.0 + dark  # DN/s; 1000 DN/s per iu
        inc = rng.poisson(np.broadcast_to(rate * dt * GAIN, (n, *shape))) / GAIN
        hits = rng.random((n, *shape)) < cr_per_pixel_s * dt
        inc = inc + hits * 10 ** rng.uniform(1.7, 3.0, (n, *shape))
        samples = np.cumsum(inc, axis=0) + 1000 + READ_NOISE_DN * rng.standard_normal((n, *shape))
        h = header(2, i, i % 4, exptime_s, n, t, stim=is_stim)
        h["RONOISE"] = READ_NOISE_DN
        h["GAIN"] = GAIN
        raws.append(
            fits.HDUList([fits.PrimaryHDU(data=np.round(samples).astype(np.int32), header=h)])
        )
        if not is_stim:
            truths.append(sky)
            keys.append((i, i % 4))
    return GeCase(raws, truths, keys, cal)
