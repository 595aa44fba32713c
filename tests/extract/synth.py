"""Seeded synthetic mosaics and BCD frames with injected point sources (truth for extract tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from services.extract.prf import pixel_integrated_gaussian_1d, sigma_from_fwhm
from shared.bcd import BCDFrame
from shared.instruments import mips

UJY_PER_MJYSR_ARCSEC2 = 1e12 * mips.SR_PER_ARCSEC2


@dataclass(frozen=True)
class Mosaic:
    image: np.ndarray  # MJy/sr
    unc: np.ndarray  # MJy/sr
    coverage: np.ndarray  # frames
    header: fits.Header
    truth: Table  # ra, dec (deg), x, y (0-based px), flux_ujy, snr_true


def tan_header(*, shape: tuple[int, int], pixel_arcsec: float, ra0: float, dec0: float,
               pa_deg: float = 0.0, channel: int | None = None) -> fits.Header:
    ny, nx = shape
    s = pixel_arcsec / 3600.0
    pa = math.radians(pa_deg)
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = nx
    h["NAXIS2"] = ny
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CRPIX1"] = (nx + 1) / 2.0
    h["CRPIX2"] = (ny + 1) / 2.0
    h["CRVAL1"] = ra0
    h["CRVAL2"] = dec0
    h["CD1_1"] = -s * math.cos(pa)
    h["CD1_2"] = s * math.sin(pa)
    h["CD2_1"] = s * math.sin(pa)
    h["CD2_2"] = s * math.cos(pa)
    h["BUNIT"] = "MJy/sr"
    if channel is not None:
        h["TELESCOP"] = "Spitzer"
        h["INSTRUME"] = "MIPS"
        h["CHNLNUM"] = channel
    return h


def render_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux_pix: np.ndarray,
                   *, sigma_px: float, half_size: int) -> np.ndarray:
    """Sum of pixel-integrated Gaussians (flux in image unit x pixel) on an image."""
    ny, nx = shape
    off = np.arange(-half_size, half_size + 1)
    cx = np.round(x).astype(int)
    cy = np.round(y).astype(int)
    px = cx[:, None] + off
    py = cy[:, None] + off
    gx, _ = pixel_integrated_gaussian_1d(px - x[:, None], sigma_px)
    gy, _ = pixel_integrated_gaussian_1d(py - y[:, None], sigma_px)
    stamp = flux_pix[:, None, None] * gy[:, :, None] * gx[:, None, :]
    yy = np.broadcast_to(py[:, :, None], stamp.shape)
    xx = np.broadcast_to(px[:, None, :], stamp.shape)
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    out = np.zeros(ny * nx)
    np.add.at(out, (yy[ok] * nx + xx[ok]), stamp[ok])
    return out.reshape(ny, nx)


def point_source_noise_ujy(x: np.ndarray, y: np.ndarray, unc_ujy_pix: np.ndarray, *,
                           sigma_px: float) -> np.ndarray:
    """1-sigma noise of an optimal PSF fit of a source at (x, y): 1/sqrt(sum P^2 / sigma^2)."""
    h = math.ceil(5 * sigma_px)
    off = np.arange(-h, h + 1)
    gx, _ = pixel_integrated_gaussian_1d(np.round(x)[:, None] + off - x[:, None], sigma_px)
    gy, _ = pixel_integrated_gaussian_1d(np.round(y)[:, None] + off - y[:, None], sigma_px)
    p2 = (gy[:, :, None] * gx[:, None, :]) ** 2
    iy = np.clip(np.round(y).astype(int), 0, unc_ujy_pix.shape[0] - 1)
    ix = np.clip(np.round(x).astype(int), 0, unc_ujy_pix.shape[1] - 1)
    return unc_ujy_pix[iy, ix] / np.sqrt(p2.sum(axis=(1, 2)))


def make_mosaic(
    *,
    shape: tuple[int, int] = (300, 300),
    pixel_arcsec: float = 2.45,
    fwhm_arcsec: float = 5.9,
    n_sources: int = 120,
    snr_range: tuple[float, float] = (3.0, 300.0),
    sigma1_mjysr: float = 0.03,
    background_mjysr: float = 20.0,
    seed: int = 1,
    ra0: float = 150.0,
    dec0: float = 2.0,
    channel: int | None = 1,
    truth_radec: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    min_sep_fwhm: float = 0.0,
) -> Mosaic:
    """A mosaic with Gaussian PSF sources over a smooth background and known Gaussian noise.

    Coverage varies smoothly (4..12 frames), unc = sigma1 / sqrt(coverage). Source fluxes are
    log-uniform in true S/N over `snr_range` unless `truth_radec` = (ra, dec, flux_ujy) gives
    them. Truth positions are 0-based pixels.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    header = tan_header(shape=shape, pixel_arcsec=pixel_arcsec, ra0=ra0, dec0=dec0,
                        channel=channel)
    wcs = WCS(header)
    yy, xx = np.mgrid[0:ny, 0:nx]
    coverage = np.round(8 + 4 * np.sin(xx / nx * 2.5) * np.cos(yy / ny * 1.7)).astype(float)
    unc = sigma1_mjysr / np.sqrt(coverage)
    # A smooth background with a realistic (zodiacal-light-like) 1% gradient and 0.5% wave.
    bkg = background_mjysr * (1 + 0.01 * (xx / nx) + 0.005 * np.sin(yy / ny * 3.0))
    sigma_px = sigma_from_fwhm(fwhm_arcsec / pixel_arcsec)
    ujy_pix = UJY_PER_MJYSR_ARCSEC2 * pixel_arcsec**2
    if truth_radec is None:
        margin = 3.0
        x = rng.uniform(margin, nx - 1 - margin, n_sources)
        y = rng.uniform(margin, ny - 1 - margin, n_sources)
        if min_sep_fwhm > 0:
            # Thin the list to a minimum separation (keeps the first of a close pair).
            keep = np.ones(x.size, dtype=bool)
            d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
            lim = (min_sep_fwhm * fwhm_arcsec / pixel_arcsec) ** 2
            for i in range(x.size):  # test helper: a few hundred sources
                if keep[i]:
                    close = d2[i] < lim
                    close[: i + 1] = False
                    keep[close] = False
            x, y = x[keep], y[keep]
        noise = point_source_noise_ujy(x, y, unc * ujy_pix, sigma_px=sigma_px)
        snr = np.exp(rng.uniform(math.log(snr_range[0]), math.log(snr_range[1]), x.size))
        flux = snr * noise
        ra, dec = wcs.pixel_to_world_values(x, y)
    else:
        ra, dec, flux = (np.asarray(a, dtype=float) for a in truth_radec)
        x, y = wcs.world_to_pixel_values(ra, dec)
        x, y = np.asarray(x), np.asarray(y)
    noise = point_source_noise_ujy(x, y, unc * ujy_pix, sigma_px=sigma_px)
    src = render_sources(shape, x, y, flux / ujy_pix, sigma_px=sigma_px,
                         half_size=math.ceil(6 * sigma_px))
    image = bkg + src + rng.normal(size=shape) * unc
    truth = Table({"ra": ra, "dec": dec, "x": x, "y": y, "flux_ujy": flux,
                   "snr_true": flux / noise})
    return Mosaic(image=image.astype(np.float32), unc=unc.astype(np.float32),
                  coverage=coverage.astype(np.float32), header=header, truth=truth)


def make_bcd_frames(
    ra: np.ndarray,
    dec: np.ndarray,
    flux_ujy: np.ndarray,
    *,
    channel: int,
    ra0: float,
    dec0: float,
    n_frames: int,
    dither_arcsec: float,
    unc_mjysr: float,
    background_mjysr: float = 15.0,
    seed: int = 2,
    bad_pixel_fraction: float = 0.01,
    airy_obscuration: float | None = None,
) -> list[BCDFrame]:
    """BCD frames of a MIPS channel (TAN-SIP WCS from `mips.wcs_keywords`) dithered around
    (ra0, dec0), each with the injected sources, a background, Gaussian noise and a few
    fatal-flagged pixels (PMASK) holding garbage. Sources are Gaussians of the band's FWHM, or
    with `airy_obscuration` the obscured Airy pattern of the 85 cm mirror at the band's
    wavelength."""
    rng = np.random.default_rng(seed)
    band = mips.BANDS[channel]
    shape = (band.nrows, band.ncols)
    frames = []
    ujy_pix_nominal = UJY_PER_MJYSR_ARCSEC2 * band.pixel_arcsec**2
    sigma_px = sigma_from_fwhm(band.psf_fwhm_arcsec / band.pixel_arcsec)
    for k in range(n_frames):
        dra, ddec = rng.uniform(-dither_arcsec, dither_arcsec, 2) / 3600.0
        kw = mips.wcs_keywords(channel, ra_deg=ra0 + dra / math.cos(math.radians(dec0)),
                               dec_deg=dec0 + ddec, pa_deg=float(rng.uniform(0, 360)))
        h = fits.Header()
        h["NAXIS"] = 2
        h["NAXIS1"] = shape[1]
        h["NAXIS2"] = shape[0]
        for key, val in kw.items():
            h[key] = val
        h["TELESCOP"] = "Spitzer"
        h["INSTRUME"] = "MIPS"
        h["CHNLNUM"] = channel
        h["DCENUM"] = k + 1
        h["BUNIT"] = "MJy/sr"
        w = WCS(h, relax=True)
        x, y = w.all_world2pix(ra, dec, 0)
        # The SIP distortion changes the pixel solid angle only at the 1e-4 level here.
        if airy_obscuration is None:
            src = render_sources(shape, np.asarray(x), np.asarray(y),
                                 flux_ujy / ujy_pix_nominal, sigma_px=sigma_px,
                                 half_size=math.ceil(6 * sigma_px))
        else:
            src = render_airy_sources(
                shape, np.asarray(x), np.asarray(y), flux_ujy / ujy_pix_nominal,
                lambda_over_d_px=band.lambda_over_d_arcsec / band.pixel_arcsec,
                obscuration=airy_obscuration, half_size=20, subsample=5)
        unc = np.full(shape, unc_mjysr)
        data = background_mjysr + src + rng.normal(size=shape) * unc
        mask = np.zeros(shape, dtype=np.int32)
        bad = rng.random(shape) < bad_pixel_fraction
        mask[bad] = int(mips.MaskBit.PMASK)
        data[bad] = 1e4
        if channel == 2:
            mask[16:, :] |= int(mips.MaskBit.BAD_HALF)
            data[16:, :] = np.nan
        frames.append(BCDFrame(data=data.astype(np.float32), unc=unc.astype(np.float32),
                               mask=mask, header=h))
    return frames


def airy_intensity(r_over_lambda_d: np.ndarray, obscuration: float) -> np.ndarray:
    """Unit-power obscured Airy pattern per (lambda/D)^2 at radius r (in lambda/D), written out
    from the textbook formula (independent of services.extract.prfmodel, which it checks)."""
    from scipy.special import j1

    x = np.pi * np.maximum(r_over_lambda_d, 1e-12)
    e = obscuration
    amp = 2 * j1(x) / x
    if e > 0:
        amp = (amp - e * e * 2 * j1(e * x) / (e * x)) / (1 - e * e)
    return (np.pi / 4) * (1 - e * e) * amp**2


def render_airy_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray,
                        flux_pix: np.ndarray, *, lambda_over_d_px: float, obscuration: float,
                        half_size: int, subsample: int = 7) -> np.ndarray:
    """Sum of obscured Airy patterns integrated over the pixels (midpoint rule on
    `subsample`^2 points per pixel), flux in image unit x pixel, out to `half_size` pixels."""
    ny, nx = shape
    off = np.arange(-half_size, half_size + 1)
    sub = (np.arange(subsample) + 0.5) / subsample - 0.5
    out = np.zeros(ny * nx)
    for xi, yi, fi in zip(x, y, flux_pix, strict=True):  # test helper: tens of sources
        px = round(xi) + off
        py = round(yi) + off
        dx = (px[None, :, None, None] + sub[None, None, None, :] - xi)
        dy = (py[:, None, None, None] + sub[None, None, :, None] - yi)
        r = np.hypot(dx, dy) / lambda_over_d_px
        stamp = airy_intensity(r, obscuration).mean(axis=(2, 3)) / lambda_over_d_px**2
        yy, xx = np.meshgrid(py, px, indexing="ij")
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        np.add.at(out, yy[ok] * nx + xx[ok], fi * stamp[ok])
    return out.reshape(ny, nx)
