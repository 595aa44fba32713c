"""ISOCAM AAR maps: CCIM -> CMAP (Jy per pointing) and CMOS (raster mosaic), quick-look PNG.

Both products use the "Green Bank" convention: each row is one image (TYPE FLUX, FLUX_ERR or
EXPOSURE) and carries its own image keywords as columns (ARRAY, TYPE, BUNIT, NAXISn, CTYPEn,
CRPIXn, CRVALn, CDELTn, CROTA2). CMAP images are 1024-element vectors (32x32, row major);
CMOS images are NAXIS1 x NAXIS2 vectors (TDIM given). CMAP.OBSINDEX -> CCIM row,
CMOS.MAPINDEX -> CMAP rows (1-based).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy import ndimage

from services.calibrate.isocam.fluxcal import to_jy
from shared.instruments import isocam as ic

VERSION = "AAR-MAP 1.0"
TYPES = ("FLUX", "FLUX_ERR", "EXPOSURE")
UNITS = {"FLUX": "Jy/pixel", "FLUX_ERR": "Jy/pixel", "EXPOSURE": "s"}


@dataclass(slots=True)
class AarMaps:
    """CMAP, CMOS and the quick-look PNG of one observation."""

    cmap: fits.HDUList
    cmos: fits.HDUList
    png: bytes


def _wcs_columns(wcs_list: list[WCS], types: list[str], shape: tuple[int, int],
                 rolls: NDArray) -> list[fits.Column]:
    n = len(types)
    return [
        fits.Column("TYPE", "8A", array=np.array(types)),
        fits.Column("BUNIT", "8A", array=np.array([UNITS[t] for t in types])),
        fits.Column("NAXIS1", "J", array=np.full(n, shape[1])),
        fits.Column("NAXIS2", "J", array=np.full(n, shape[0])),
        fits.Column("CTYPE1", "8A", array=np.full(n, "RA---TAN")),
        fits.Column("CTYPE2", "8A", array=np.full(n, "DEC--TAN")),
        fits.Column("CRPIX1", "D", array=np.array([w.wcs.crpix[0] for w in wcs_list])),
        fits.Column("CRPIX2", "D", array=np.array([w.wcs.crpix[1] for w in wcs_list])),
        fits.Column("CRVAL1", "D", unit="deg", array=np.array([w.wcs.crval[0] for w in wcs_list])),
        fits.Column("CRVAL2", "D", unit="deg", array=np.array([w.wcs.crval[1] for w in wcs_list])),
        fits.Column("CDELT1", "D", unit="deg", array=np.array([w.wcs.cdelt[0] for w in wcs_list])),
        fits.Column("CDELT2", "D", unit="deg", array=np.array([w.wcs.cdelt[1] for w in wcs_list])),
        fits.Column("CROTA2", "E", unit="deg", array=np.asarray(rolls, dtype=np.float32)),
    ]


def make_cmap(ccim: fits.HDUList) -> fits.HDUList:
    """CCIM (ADU/G/s per raster position) -> CMAP: FLUX, FLUX_ERR (Jy/pixel), EXPOSURE (s)
    rows per position, on the array grid of that pointing."""
    h0 = ccim[0].header
    filt, lens = str(h0["FILTER"]), float(h0["LENS"])
    rate = ic.column(ccim, "ARRAY").astype(np.float64)
    flux = to_jy(rate, filter_name=filt, lens_arcsec=lens)
    err = to_jy(ic.column(ccim, "ARRAYERR").astype(np.float64), filter_name=filt,
                lens_arcsec=lens)
    expo = ic.column(ccim, "EXPMAP").astype(np.float64)
    ra, dec, roll = (ic.column(ccim, k) for k in ("RA", "DEC", "ROLL"))
    npos = rate.shape[0]
    arrays = np.stack([flux, err, expo], axis=1).reshape(3 * npos, ic.NPIX)
    types = list(TYPES) * npos
    wcs_list = [ic.array_wcs(float(ra[i]), float(dec[i]), float(roll[i]), lens)
                for i in range(npos) for _ in TYPES]
    h = ic.carry(h0, root="CMAP")
    h["RADESYS"] = ("ICRS", "frame of the CRVALn columns")
    h["FLUXCONV"] = (ic.flux_conversion(filt, lens), "[ADU/G/s/Jy] point-source conversion")
    h["AARMAP"] = (VERSION, "version of the map step")
    h.add_comment("Green Bank convention: image keywords are columns; ARRAY is 32x32 row major")
    cols = [
        fits.Column("OBSINDEX", "J", array=np.repeat(np.arange(1, npos + 1), 3)),
        fits.Column("RASTPOS", "J", array=np.repeat(ic.column(ccim, "RASTPOS"), 3)),
        *_wcs_columns(wcs_list, types, (ic.NPIX_SIDE, ic.NPIX_SIDE), np.repeat(roll, 3)),
        fits.Column("EXPTIME", "E", unit="s", array=np.repeat(ic.column(ccim, "EXPTIME"), 3)),
        fits.Column("ARRAY", f"{ic.NPIX}E", array=np.nan_to_num(arrays).astype(np.float32)),
    ]
    return ic.table_product(h, cols, root="CMAP")


def cmap_image(cmap: fits.HDUList, row: int) -> tuple[NDArray[np.float64], WCS]:
    """Image (2-D) and WCS of CMAP/CMOS row `row` (0-based) from its Green Bank columns."""
    d = cmap[1].data
    w = WCS(naxis=2)
    w.wcs.ctype = [str(d["CTYPE1"][row]), str(d["CTYPE2"][row])]
    w.wcs.crpix = [float(d["CRPIX1"][row]), float(d["CRPIX2"][row])]
    w.wcs.crval = [float(d["CRVAL1"][row]), float(d["CRVAL2"][row])]
    w.wcs.cdelt = [float(d["CDELT1"][row]), float(d["CDELT2"][row])]
    c, s = np.cos(np.radians(float(d["CROTA2"][row]))), np.sin(np.radians(float(d["CROTA2"][row])))
    w.wcs.pc = [[c, s], [-s, c]]
    w.wcs.radesys = "ICRS"
    img = np.asarray(d["ARRAY"][row], dtype=np.float64).reshape(int(d["NAXIS2"][row]),
                                                                 int(d["NAXIS1"][row]))
    return img, w


def mosaic_grid(ra_deg: NDArray, dec_deg: NDArray, *, lens_arcsec: float, pixel_arcsec: float
                ) -> WCS:
    """North-up TAN grid holding every pointing's 32x32 footprint."""
    half = ic.NPIX_SIDE * lens_arcsec / 2.0 * np.sqrt(2.0)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(np.mean(ra_deg)), float(np.mean(dec_deg))]
    w.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.radesys = "ICRS"
    x, y = w.wcs_world2pix(ra_deg, dec_deg, 0)
    m = half / pixel_arcsec
    x0, y0 = np.floor(x.min() - m), np.floor(y.min() - m)
    w.wcs.crpix = [1.0 - x0, 1.0 - y0]
    w.pixel_shape = (int(np.ceil(x.max() + m - x0)) + 1, int(np.ceil(y.max() + m - y0)) + 1)
    return w


def make_cmos(cmap: fits.HDUList, *, pixel_arcsec: float | None = None) -> fits.HDUList:
    """CMAP -> CMOS: exposure-weighted mean of the pointings on a north-up TAN grid.

    Each sky pixel centre is mapped into every pointing's array and the FLUX x EXPOSURE and
    EXPOSURE images are bilinearly interpolated where all four neighbours are valid (dead or
    empty pixels never contribute; a sky pixel no pointing covers has EXPOSURE 0, FLUX NaN).
    FLUX is rescaled from Jy per array pixel to Jy per mosaic pixel.
    Default mosaic pixel: half the lens pixel field.
    """
    d = cmap[1].data
    h0 = cmap[0].header
    types = np.char.strip(np.asarray(d["TYPE"]).astype(str))
    rows = {t: np.nonzero(types == t)[0] for t in TYPES}
    lens = float(h0["LENS"])
    pix = lens / 2.0 if pixel_arcsec is None else pixel_arcsec
    grid = mosaic_grid(np.asarray(d["CRVAL1"])[rows["FLUX"]], np.asarray(d["CRVAL2"])[rows["FLUX"]],
                       lens_arcsec=lens, pixel_arcsec=pix)
    nx, ny = grid.pixel_shape
    gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    ra, dec = grid.wcs_pix2world(gx, gy, 0)
    s_flux = np.zeros((ny, nx))
    s_w = np.zeros((ny, nx))
    s_var = np.zeros((ny, nx))
    for rf, re, rx in zip(rows["FLUX"], rows["FLUX_ERR"], rows["EXPOSURE"], strict=True):
        flux, w = cmap_image(cmap, int(rf))
        err = cmap_image(cmap, int(re))[0]
        expo = cmap_image(cmap, int(rx))[0]
        x, y = w.wcs_world2pix(ra, dec, 0)
        coords = np.array([y, x])
        ok = np.isfinite(flux) & (expo > 0)
        wt = np.where(ok, expo, 0.0)
        # A pointing contributes only where all 4 interpolation neighbours are valid: the dead
        # column and the array edge leave a gap for the other pointings to fill instead of a
        # smeared, biased value.
        full = ndimage.map_coordinates(ok.astype(np.float64), coords, order=1, cval=0.0) > 0.999
        s_flux += full * ndimage.map_coordinates(np.where(ok, flux, 0.0) * wt, coords, order=1)
        s_w += full * ndimage.map_coordinates(wt, coords, order=1, cval=0.0)
        s_var += full * ndimage.map_coordinates((wt * np.nan_to_num(err)) ** 2, coords, order=1,
                                                cval=0.0)
    area = (pix / lens) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        mflux = np.where(s_w > 0, s_flux / s_w * area, np.nan)
        merr = np.where(s_w > 0, np.sqrt(s_var) / s_w * area, np.nan)
    images = [mflux, merr, s_w]
    h = ic.carry(h0, root="CMOS")
    h["RADESYS"] = ("ICRS", "frame of the CRVALn columns")
    h["PIXSCALE"] = (pix, "[arcsec] mosaic pixel")
    h["FLUXCONV"] = (h0.get("FLUXCONV", 0.0), "[ADU/G/s/Jy] point-source conversion")
    h["AARMAP"] = (VERSION, "version of the map step")
    h["RESAMPLE"] = ("BILINEAR", "array to sky: normalised, exposure weighted")
    h.add_comment("Green Bank convention: image keywords are columns; ARRAY is NAXIS2 x NAXIS1")
    npos = rows["FLUX"].size
    cols = [
        fits.Column("MAPINDEX", f"{npos}J", array=np.stack([rows[t] + 1 for t in TYPES])),
        *_wcs_columns([grid] * 3, list(TYPES), (ny, nx), np.zeros(3)),
        fits.Column("ARRAY", f"{nx * ny}E", dim=f"({nx},{ny})",
                    array=np.stack([im.astype(np.float32) for im in images])),
    ]
    return ic.table_product(h, cols, root="CMOS")


def quicklook_png(image: NDArray[np.floating], *, title: str = "") -> bytes:
    """PNG (bytes) of an image with an asinh stretch, north up, east left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.nan_to_num(np.asarray(image, dtype=np.float64))
    lo, hi = np.percentile(img, [1.0, 99.8]) if img.size else (0.0, 1.0)
    soft = max(float(hi - lo), 1e-12) / 20.0
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.arcsinh((img - lo) / soft), origin="lower", cmap="gray",
              interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def make_maps(ccim: fits.HDUList, *, pixel_arcsec: float | None = None) -> AarMaps:
    """CCIM of an observation -> CMAP + CMOS + quick-look PNG of the CMOS flux."""
    cmap = make_cmap(ccim)
    cmos = make_cmos(cmap, pixel_arcsec=pixel_arcsec)
    img, _ = cmap_image(cmos, 0)
    h = cmos[0].header
    png = quicklook_png(img, title=f"{h['FILENAME']} {h.get('FILTER', '')} {h.get('OBJECT', '')}")
    return AarMaps(cmap, cmos, png)
