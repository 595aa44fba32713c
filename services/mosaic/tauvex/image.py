"""TAUVEX CRT_IMG module: bin Level 1g events on a TAN sky grid into a Level 2 image.

Level 2 product (FITS): primary HDU = flux image (BUNIT uJy/pixel, exposure corrected, flux
calibrated with the filter's uJy per count/s), then ERR (same unit, Poisson), EXPOSURE (s,
time each sky pixel spent inside the field) and COUNTS (valid events per pixel). All carry the
same TAN WCS. The exposure map follows the reported attitude through the drift scan.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy import ndimage

from services.calibrate.tauvex.calc_ra import boresight_at
from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["CRT_IMG"]


@dataclass(slots=True)
class Level2Image:
    """A Level 2 product and its quick-look."""

    hdul: fits.HDUList
    png: bytes


def sky_grid(
    ra_deg: NDArray[np.float64], dec_deg: NDArray[np.float64], *, pixel_arcsec: float,
    margin_arcsec: float = 30.0,
) -> WCS:
    """North-up TAN grid centred on the events, large enough for all of them plus a margin."""
    dec_c = float(np.median(dec_deg))
    ra_c = float(np.degrees(np.arctan2(np.mean(np.sin(np.radians(ra_deg))),
                                       np.mean(np.cos(np.radians(ra_deg))))) % 360.0)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_c, dec_c]
    w.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.radesys = "ICRS"
    x, y = w.wcs_world2pix(ra_deg, dec_deg, 0)
    m = margin_arcsec / pixel_arcsec
    x0, y0 = np.floor(x.min() - m), np.floor(y.min() - m)
    w.wcs.crpix = [1.0 - x0, 1.0 - y0]
    w.pixel_shape = (int(np.ceil(x.max() + m - x0)) + 1, int(np.ceil(y.max() + m - y0)) + 1)
    return w


def exposure_map(
    wcs: WCS, attitude: Table, tele: int, t_start_s: float, t_end_s: float, *,
    oversample: int = 2, anchor_s: float = 4.0,
) -> NDArray[np.float64]:
    """Seconds each pixel of `wcs` spent inside the field circle of telescope `tele`.

    Focal-plane positions of the pixels are computed exactly at anchor times every <= `anchor_s`
    and move linearly in between (the drift is smooth); the time inside the circle during each
    anchor interval is then the solution of a quadratic inequality, integrated exactly. Computed
    on a grid `oversample` times coarser and interpolated back (smooth except at the edge).
    """
    nx, ny = wcs.pixel_shape
    cx = np.arange(0, nx + oversample, oversample, dtype=np.float64)
    cy = np.arange(0, ny + oversample, oversample, dtype=np.float64)
    gx, gy = np.meshgrid(cx, cy)
    ra, dec = wcs.wcs_pix2world(gx, gy, 0)
    exp = np.zeros(gx.shape)
    n_anchor = max(int(np.ceil((t_end_s - t_start_s) / anchor_s)), 1) + 1
    anchors = np.linspace(t_start_s, t_end_s, n_anchor)
    a_ra, a_dec, a_roll, _ = boresight_at(attitude, tele, anchors)
    r2max = tv.FIELD_RADIUS_PX**2
    c = tv.DETECTOR_CENTER_PX
    px, py = tv.sky_to_focal(ra, dec, a_ra[0], a_dec[0], a_roll[0])
    for j in range(anchors.size - 1):  # a handful of anchor intervals, arrays inside
        nx_, ny_ = tv.sky_to_focal(ra, dec, a_ra[j + 1], a_dec[j + 1], a_roll[j + 1])
        ax, ay, bx, by = px - c, py - c, nx_ - px, ny_ - py
        qa = bx * bx + by * by
        qb = 2.0 * (ax * bx + ay * by)
        qc = ax * ax + ay * ay - r2max
        disc = qb * qb - 4.0 * qa * qc
        with np.errstate(divide="ignore", invalid="ignore"):
            sq = np.sqrt(np.maximum(disc, 0.0))
            f1 = np.where(qa > 0, (-qb - sq) / (2.0 * qa), np.where(qc < 0, 0.0, 1.0))
            f2 = np.where(qa > 0, (-qb + sq) / (2.0 * qa), np.where(qc < 0, 1.0, 0.0))
        frac = np.clip(np.minimum(f2, 1.0) - np.maximum(f1, 0.0), 0.0, 1.0)
        frac = np.where((disc > 0) | (qa == 0), frac, 0.0)
        exp += frac * (anchors[j + 1] - anchors[j])
        px, py = nx_, ny_
    fine = ndimage.map_coordinates(
        exp, np.mgrid[0:ny, 0:nx] / float(oversample), order=1, mode="nearest")
    return np.asarray(fine, dtype=np.float64)


def quicklook_png(image: NDArray[np.floating], *, title: str = "") -> bytes:
    """PNG (bytes) of an image with an asinh stretch, north up, east left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.nan_to_num(np.asarray(image, dtype=np.float64))
    lo, hi = np.percentile(img, [1.0, 99.8]) if img.size else (0.0, 1.0)
    soft = max(float(hi - lo), 1e-12) / 20.0
    stretched = np.arcsinh((img - lo) / soft)
    fig = Figure(figsize=(6, 6 * img.shape[0] / max(img.shape[1], 1) + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(stretched, origin="lower", cmap="gray", interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def make_level2(
    level1g: fits.HDUList, attitude: Table, *, pixel_arcsec: float = 3.0
) -> Level2Image:
    """Level 1g events -> Level 2 image (uJy/pixel), error, exposure (s), counts; and a PNG.

    Valid events (VALIDITY 0) are summed with their CALIB weight per pixel, divided by the
    exposure (s) and multiplied by the filter's uJy per count/s (header FLUXCONV).
    """
    hdu = level1g["EVENTS"]
    hdr = hdu.header
    tele = int(hdr["TELE_NUM"])
    cols, _ = tv.event_columns(level1g)
    ok = (cols["VALIDITY"] == 0) & np.isfinite(cols["RA"])
    ra, dec, w = cols["RA"][ok], cols["DEC"][ok], cols["CALIB"][ok].astype(np.float64)
    if ra.size == 0:
        raise ValueError(f"Level 1g of telescope T{tele} has no valid events: no image to make")
    wcs = sky_grid(ra, dec, pixel_arcsec=pixel_arcsec)
    nx, ny = wcs.pixel_shape
    x, y = wcs.wcs_world2pix(ra, dec, 0)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    flat_idx = iy * nx + ix
    counts = np.bincount(flat_idx, minlength=nx * ny).reshape(ny, nx)
    wsum = np.bincount(flat_idx, w, minlength=nx * ny).reshape(ny, nx)
    w2sum = np.bincount(flat_idx, w * w, minlength=nx * ny).reshape(ny, nx)
    t = cols["TIME"]
    exposure = exposure_map(wcs, attitude, tele, float(t.min()), float(t.max()))
    conv = tv.TELESCOPES[tele].filter.ujy_per_cps
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(exposure > 0, 1.0 / exposure, 0.0)
    flux = (wsum * inv * conv).astype(np.float32)
    err = (np.sqrt(w2sum) * inv * conv).astype(np.float32)

    h = fits.Header()
    meta = tv.product_header(hdr)
    for key in ("TELESCOP", "TELE_NUM", "FILTER", "OBS_ID", "STARTOBS", "ENDOBS", "NFRAMES",
                *(k for k in tv.MODULE_VERSIONS if k in meta), "REGREF"):
        if key in meta:
            h[key] = (meta[key], meta.comments[key])
    h["NCOUNTS"] = (int(ok.sum()), "valid events binned")
    h["DATALEVL"] = ("2", "TAUVEX Level 2 image")
    h["CRT_IMG"] = (VERSION, "version of module CRT_IMG")
    h["FLUXCONV"] = (conv, "[uJy/(count/s)] flux conversion (assumed)")
    h["PIXSCALE"] = (pixel_arcsec, "[arcsec] pixel size")
    h["PSF_FWHM"] = (tv.PSF_FWHM_ARCSEC, "[arcsec] nominal PSF FWHM")
    h["EXPTIME"] = (round(float(exposure.max()), 3), "[s] maximum exposure")
    h.update(wcs.to_header())
    prim = fits.PrimaryHDU(flux, header=h)
    prim.header["BUNIT"] = ("uJy/pixel", "flux density per pixel")
    wh = wcs.to_header()
    ext = []
    for name, data, unit in (("ERR", err, "uJy/pixel"), ("EXPOSURE", exposure.astype(np.float32),
                                                         "s"), ("COUNTS", counts.astype(np.int32),
                                                                None)):
        e = fits.ImageHDU(data, header=wh, name=name)
        if unit:
            e.header["BUNIT"] = unit
        ext.append(e)
    hdul = fits.HDUList([prim, *ext])
    png = quicklook_png(flux, title=f"TAUVEX T{tele} {h['FILTER']} obs {h.get('OBS_ID', '')}")
    return Level2Image(hdul=hdul, png=png)
