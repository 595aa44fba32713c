"""TAUVEX EXT_PS module: detect point sources on a Level 2 image and measure their fluxes.

Detection: matched filter (Gaussian PSF) on the background-subtracted counts, S/N from the
Poisson background expectation (exposure x background rate), local maxima above `snr_min`.
Photometry: aperture of radius `aperture_fwhm` x FWHM on the exposure-corrected flux image
(a 2-FWHM aperture holds > 99.9% of a Gaussian PSF: no aperture correction), local background
from the clipped mean rate, Poisson errors from the CALIB-weighted counts.
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import NDArray
from photutils.aperture import CircularAperture
from scipy import ndimage

from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["EXT_PS"]


class FlagBit:
    """FLAGS column bits of the source lists."""

    EDGE = 1  #: part of the aperture has less than half the exposure at the centre
    NO_EXPOSURE = 2  #: the position was never observed (forced photometry only)


def background_rate(counts: NDArray, exposure: NDArray, *, block: int = 32) -> float:
    """Background (counts/s per pixel): clipped mean of block rates (robust to sparse sources)."""
    ny, nx = counts.shape
    by, bx = ny // block, nx // block
    if by == 0 or bx == 0:
        tot = float(exposure.sum())
        return float(counts.sum()) / tot if tot > 0 else 0.0
    c = counts[: by * block, : bx * block].reshape(by, block, bx, block).sum(axis=(1, 3))
    e = exposure[: by * block, : bx * block].reshape(by, block, bx, block)
    full = (e.min(axis=(1, 3)) > 0.5 * exposure.max())
    rates = c[full] / e.sum(axis=(1, 3))[full]
    if rates.size < 3:
        tot = float(exposure.sum())
        return float(counts.sum()) / tot if tot > 0 else 0.0
    mean, _, _ = sigma_clipped_stats(rates, sigma=3.0)
    return float(mean)


def _apsums(images: list[NDArray], x: NDArray, y: NDArray, r_pix: float) -> list[NDArray]:
    """Exact-overlap sums of each image in circles of radius r_pix at (x, y) (0-based px)."""
    ap = CircularAperture(np.column_stack([x, y]), r=r_pix)
    return [np.atleast_1d(np.asarray(ap.do_photometry(img, method="exact")[0], dtype=np.float64))
            for img in images]


def forced_photometry(
    level2: fits.HDUList, ra_deg: NDArray[np.floating], dec_deg: NDArray[np.floating], *,
    aperture_fwhm: float = 2.0, background_cps_pix: float | None = None,
) -> Table:
    """Aperture photometry (uJy) at fixed positions: FLUX_UJY, FLUX_ERR_UJY, SNR, EXPTIME_S."""
    flux = np.asarray(level2[0].data, dtype=np.float64)
    err = np.asarray(level2["ERR"].data, dtype=np.float64)
    exposure = np.asarray(level2["EXPOSURE"].data, dtype=np.float64)
    counts = np.asarray(level2["COUNTS"].data, dtype=np.float64)
    h = level2[0].header
    conv = float(h["FLUXCONV"])
    wcs = WCS(h)
    bkg = background_rate(counts, exposure) if background_cps_pix is None else background_cps_pix
    r_pix = aperture_fwhm * tv.PSF_FWHM_ARCSEC / float(h["PIXSCALE"])
    x, y = wcs.wcs_world2pix(np.atleast_1d(ra_deg), np.atleast_1d(dec_deg), 0)
    tab = Table()
    tab["RA"], tab["DEC"], tab["X"], tab["Y"] = np.atleast_1d(ra_deg), np.atleast_1d(dec_deg), x, y
    n = x.size
    if n == 0:
        for c in ("FLUX_UJY", "FLUX_ERR_UJY", "SNR", "EXPTIME_S"):
            tab[c] = np.zeros(0)
        tab["FLAGS"] = np.zeros(0, dtype=np.int16)
        return tab
    exposed = (exposure > 0).astype(np.float64)
    s_flux, s_var, n_exp_pix, s_expo = _apsums([flux, err**2, exposed, exposure], x, y, r_pix)
    f = s_flux - bkg * conv * n_exp_pix
    # Error: Poisson of the weighted counts, or the background expectation if larger.
    mean_exp = np.where(n_exp_pix > 0, s_expo / np.maximum(n_exp_pix, 1e-9), 0.0)
    var_bkg = np.where(mean_exp > 0, bkg * n_exp_pix / np.maximum(mean_exp, 1e-9), 0.0) * conv**2
    sigma = np.sqrt(np.maximum(s_var, var_bkg) + 1e-30)
    xi = np.clip(np.rint(x).astype(np.int64), 0, exposure.shape[1] - 1)
    yi = np.clip(np.rint(y).astype(np.int64), 0, exposure.shape[0] - 1)
    centre_exp = exposure[yi, xi]
    area = np.pi * r_pix**2
    flags = np.zeros(n, dtype=np.int16)
    flags |= np.where(n_exp_pix < 0.98 * area, FlagBit.EDGE, 0).astype(np.int16)
    flags |= np.where(mean_exp < 0.5 * centre_exp, FlagBit.EDGE, 0).astype(np.int16)
    flags |= np.where(centre_exp <= 0, FlagBit.NO_EXPOSURE, 0).astype(np.int16)
    tab["FLUX_UJY"] = np.where(centre_exp > 0, f, np.nan)
    tab["FLUX_ERR_UJY"] = np.where(centre_exp > 0, sigma, np.nan)
    tab["SNR"] = tab["FLUX_UJY"] / tab["FLUX_ERR_UJY"]
    tab["EXPTIME_S"] = centre_exp
    tab["FLAGS"] = flags
    return tab


def _centroids(counts: NDArray, x: NDArray, y: NDArray, r_pix: float, n_iter: int = 3) -> tuple:
    """Counts-weighted centroids within r_pix, iterated (first moments via aperture sums)."""
    ny, nx = counts.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    for _ in range(n_iter):
        s, sx, sy = _apsums([counts, counts * xx, counts * yy], x, y, r_pix)
        ok = s > 0
        x = np.where(ok, sx / np.where(ok, s, 1), x)
        y = np.where(ok, sy / np.where(ok, s, 1), y)
    return x, y


def detect_sources(
    level2: fits.HDUList, *, snr_min: float = 5.0, min_counts: float = 8.0,
    aperture_fwhm: float = 2.0, min_exposure_frac: float = 0.05,
) -> Table:
    """Point-source list of one Level 2 image (one scan, one filter).

    Columns SRCID, RA, DEC (deg), X, Y (image pixels, 0-based), FLUX_UJY, FLUX_ERR_UJY, SNR,
    EXPTIME_S, FLAGS, DET_SNR (matched-filter detection S/N), NCOUNTS (events in 1 FWHM).
    """
    h = level2[0].header
    counts = np.asarray(level2["COUNTS"].data, dtype=np.float64)
    exposure = np.asarray(level2["EXPOSURE"].data, dtype=np.float64)
    fwhm_pix = tv.PSF_FWHM_ARCSEC / float(h["PIXSCALE"])
    sigma = fwhm_pix / 2.3548
    bkg = background_rate(counts, exposure)
    model_bkg = bkg * exposure
    sig = ndimage.gaussian_filter(counts - model_bkg, sigma)
    # Noise of the matched filter: sum k^2 * expected counts; k^2 of a Gaussian is a Gaussian of
    # sigma/sqrt(2) scaled by 1/(4 pi sigma^2). A floor of one count per PSF keeps near-empty
    # background from producing infinite S/N.
    noise = np.sqrt(np.maximum(ndimage.gaussian_filter(model_bkg, sigma / np.sqrt(2.0)),
                               1.0 / (2 * np.pi * sigma**2)) / (4 * np.pi * sigma**2))
    snr_map = sig / noise
    peak = (snr_map == ndimage.maximum_filter(snr_map, size=int(2 * fwhm_pix) | 1))
    peak &= (snr_map >= snr_min) & (exposure > min_exposure_frac * exposure.max())
    py, px = np.nonzero(peak)
    x, y = _centroids(counts, px.astype(np.float64), py.astype(np.float64), fwhm_pix)
    ncounts = _apsums([counts], x, y, fwhm_pix)[0] if x.size else np.zeros(0)
    keep = ncounts >= min_counts
    x, y, det = x[keep], y[keep], snr_map[py, px][keep]
    ncounts = ncounts[keep]
    # Merge peaks that converged onto the same source.
    if x.size > 1:
        order = np.argsort(-det)
        x, y, det, ncounts = x[order], y[order], det[order], ncounts[order]
        d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
        dup = np.triu(d2 < (0.5 * fwhm_pix) ** 2, k=1).any(axis=0)
        x, y, det, ncounts = x[~dup], y[~dup], det[~dup], ncounts[~dup]
    wcs = WCS(h)
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    tab = forced_photometry(level2, ra, dec, aperture_fwhm=aperture_fwhm,
                            background_cps_pix=bkg)
    tab.add_column(np.arange(1, len(tab) + 1, dtype=np.int32), name="SRCID", index=0)
    tab["DET_SNR"] = det
    tab["NCOUNTS"] = ncounts
    tab.meta.update({
        "TELESCOP": tv.TELESCOP, "TELE_NUM": int(h["TELE_NUM"]), "FILTER": str(h["FILTER"]),
        "OBS_ID": int(h.get("OBS_ID", 0)), "EXT_PS": VERSION, "BKG_CPS": bkg,
        "SNR_MIN": snr_min, "APER_FW": aperture_fwhm,
    })
    for key in ("STARTOBS", "ENDOBS", "CRT_IMG", "REGISTER"):
        if key in h:
            tab.meta[key] = h[key]
    _units(tab)
    return tab


def _units(tab: Table) -> None:
    for c in tab.colnames:
        if c in ("RA", "DEC") or c.startswith(("RA_", "DEC_")):
            tab[c].unit = "deg"
        elif "UJY" in c:
            tab[c].unit = "uJy"
        elif c.startswith("EXPTIME"):
            tab[c].unit = "s"
        elif c in ("X", "Y"):
            tab[c].unit = "pixel"


def table_to_fits(tab: Table, *, extname: str = "SOURCES") -> fits.HDUList:
    """Source table -> HDUList (empty primary + BINTABLE; meta keywords in both headers)."""
    prim = fits.PrimaryHDU()
    bt = fits.BinTableHDU(tab, name=extname)
    for k, v in tab.meta.items():
        if isinstance(v, (str, int, float, bool, np.integer, np.floating)) and len(k) <= 8:
            prim.header[k.upper()] = v
    return fits.HDUList([prim, bt])


def table_to_ipac(tab: Table) -> str:
    """Source table -> IPAC table text (header keywords from meta)."""
    out = tab.copy(copy_data=True)
    out.meta = {"keywords": {k: {"value": v} for k, v in tab.meta.items()
                             if isinstance(v, (str, int, float, np.integer, np.floating))}}
    buf = io.StringIO()
    out.write(buf, format="ascii.ipac")
    return buf.getvalue()
