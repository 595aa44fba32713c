"""ISOCAM point-source extraction on CMOS (or one CMAP pointing) -> CPSL point-source list.

Detection: matched filter on the FLUX image, peaks above a S/N threshold where the exposure is
at least a fraction of its maximum. Positions: least-squares fit of the effective PSF (optics
Gaussian x array pixel x bilinear resampling). Fluxes: aperture photometry with an annulus
background and a per-source aperture correction from the same effective PSF; the flux error
is scaled by the measured noise of random source-free apertures (the resampled pixels are
correlated, so the FLUX_ERR image alone underestimates it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy import ndimage, optimize

from services.mosaic.isocam.maps import cmap_image
from shared.instruments import isocam as ic

VERSION = "AAR-PSL 1.0"


@dataclass(frozen=True, slots=True)
class EffectivePsf:
    """Jy per mosaic pixel of a 1 Jy point source as a function of the offset (mosaic px)."""

    jac: NDArray[np.float64]  #: (2, 2) mosaic offset -> array-pixel offset
    area_ratio: float  #: mosaic pixel area / array pixel area
    u: NDArray[np.float64]  #: 1-D abscissa (array px)
    k: NDArray[np.float64]  #: 1-D profile density per array px (integral 1)

    def __call__(self, dx: NDArray[np.floating], dy: NDArray[np.floating]) -> NDArray:
        du = self.jac[0, 0] * dx + self.jac[0, 1] * dy
        dv = self.jac[1, 0] * dx + self.jac[1, 1] * dy
        return (np.interp(du, self.u, self.k, 0.0, 0.0) * np.interp(dv, self.u, self.k, 0.0, 0.0)
                * self.area_ratio)

    @property
    def fwhm_px(self) -> float:
        """FWHM in mosaic pixels (along an array axis)."""
        above = self.u[self.k >= self.k.max() / 2]
        return float((above.max() - above.min()) / np.hypot(*self.jac[0]))


def effective_psf(*, filter_name: str, lens_arcsec: float, image_wcs: WCS, array_wcs: WCS,
                  bilinear: bool = True) -> EffectivePsf:
    """Effective PSF of an image whose pixels were sampled from the array (`array_wcs`).

    Profile per array axis: Gaussian (isocam.psf_fwhm_arcsec) convolved with the array pixel
    (box of 1 px) and, for a resampled mosaic, the bilinear kernel (triangle of half-width 1).
    """
    step = 0.01
    u = np.arange(-8.0, 8.0 + step / 2, step)
    sig = ic.psf_fwhm_arcsec(filter_name) / lens_arcsec / 2.3548
    k = np.exp(-0.5 * (u / sig) ** 2)
    box = (np.abs(u) <= 0.5).astype(np.float64)
    k = np.convolve(k, box, mode="same")
    if bilinear:
        k = np.convolve(k, np.maximum(1.0 - np.abs(u), 0.0), mode="same")
    k /= k.sum() * step
    # Jacobian of image pixel -> array pixel near the image centre (numerical).
    nx, ny = image_wcs.pixel_shape if image_wcs.pixel_shape else (64, 64)
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    sky = image_wcs.wcs_pix2world([[cx, cy], [cx + 1, cy], [cx, cy + 1]], 0)
    a = array_wcs.wcs_world2pix(sky, 0)
    jac = np.array([[a[1, 0] - a[0, 0], a[2, 0] - a[0, 0]], [a[1, 1] - a[0, 1], a[2, 1] - a[0, 1]]])
    return EffectivePsf(jac, float(abs(np.linalg.det(jac))), u, k)


@dataclass(frozen=True, slots=True)
class Photometry:
    flux_jy: NDArray[np.float64]
    flux_err_jy: NDArray[np.float64]
    aperture_correction: NDArray[np.float64]
    coverage: NDArray[np.float64]  #: covered fraction of the point-source flux in the aperture


def aperture_photometry(image: NDArray[np.floating], err: NDArray[np.floating],
                        x: NDArray[np.floating], y: NDArray[np.floating], psf: EffectivePsf, *,
                        radius_px: float, annulus_px: tuple[float, float],
                        noise_scale: float = 1.0) -> Photometry:
    """Aperture sums (Jy) at (x, y) (0-based image px) minus the annulus median, divided by the
    aperture correction (fraction of a point source inside, from `psf`)."""
    ny, nx = image.shape
    r_out = annulus_px[1]
    half = int(np.ceil(r_out)) + 1
    oy, ox = np.mgrid[-half:half + 1, -half:half + 1]
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    ix = np.rint(xs).astype(int)[:, None, None] + ox[None]
    iy = np.rint(ys).astype(int)[:, None, None] + oy[None]
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    cx, cy = np.clip(ix, 0, nx - 1), np.clip(iy, 0, ny - 1)
    v = np.where(inside, image[cy, cx], np.nan)
    e = np.where(inside, err[cy, cx], np.nan)
    dx = ix - xs[:, None, None]
    dy = iy - ys[:, None, None]
    r = np.hypot(dx, dy)
    fin = np.isfinite(v)
    ap = (r <= radius_px) & fin  # uncovered pixels are left out and the correction follows
    ann = (r >= annulus_px[0]) & (r <= annulus_px[1]) & np.isfinite(v)
    bkg = np.array([np.median(vi[a]) if a.any() else 0.0 for vi, a in zip(v, ann, strict=True)])
    vals = np.where(ap, v - bkg[:, None, None], 0.0)
    total = np.nansum(vals, axis=(1, 2))
    npix = ap.sum(axis=(1, 2))
    nann = np.maximum(ann.sum(axis=(1, 2)), 1)
    var = np.nansum(np.where(ap, e * e, 0.0), axis=(1, 2))
    # background error: the annulus median (~1.25 x mean error) over npix pixels
    var_bkg = npix**2 * 1.57 * np.nanmean(np.where(ann, e * e, np.nan), axis=(1, 2)) / nann
    corr = np.sum(np.where(ap, psf(dx, dy), 0.0), axis=(1, 2))
    corr_bkg = np.sum(np.where(ann, psf(dx, dy), 0.0), axis=(1, 2)) / nann * npix
    corr = corr - corr_bkg  # the PSF wing in the annulus is subtracted with the background
    full = np.sum(np.where(r <= radius_px, psf(dx, dy), 0.0), axis=(1, 2)) - corr_bkg
    with np.errstate(invalid="ignore", divide="ignore"):  # uncovered positions give NaN
        ferr = np.sqrt(var + np.nan_to_num(var_bkg)) * noise_scale / corr
        return Photometry(total / corr, ferr, corr, corr / np.maximum(full, 1e-12))


def _fit_position(image: NDArray, x0: float, y0: float, psf: EffectivePsf, half: int = 4
                  ) -> tuple[float, float]:
    ny, nx = image.shape
    ix, iy = round(x0), round(y0)
    ys, xs = np.mgrid[max(iy - half, 0):min(iy + half + 1, ny),
                      max(ix - half, 0):min(ix + half + 1, nx)]
    data = image[ys, xs]
    fin = np.isfinite(data)
    xs, ys, data = xs[fin], ys[fin], data[fin]
    if data.size < 8:
        return x0, y0

    def resid(p: NDArray) -> NDArray:
        return (p[2] * psf(xs - p[0], ys - p[1]) + p[3] - data).ravel()

    peak = float(data.max() - np.median(data))
    p0 = np.array([x0, y0, max(peak / max(psf(np.zeros(1), np.zeros(1))[0], 1e-12), 1e-9),
                   float(np.median(data))])
    res = optimize.least_squares(resid, p0, x_scale=[1.0, 1.0, abs(p0[2]) + 1e-9, peak + 1e-12])
    if not res.success or abs(res.x[0] - x0) > 3 or abs(res.x[1] - y0) > 3:
        return x0, y0
    return float(res.x[0]), float(res.x[1])


def random_aperture_noise(image: NDArray, err: NDArray, good: NDArray[np.bool_],
                          psf: EffectivePsf, *, radius_px: float, annulus_px: tuple[float, float],
                          mask: NDArray[np.bool_], n: int = 300, seed: int = 0) -> float:
    """Measured / predicted scatter of aperture fluxes at random source-free positions."""
    rng = np.random.default_rng(seed)
    ny, nx = image.shape
    m = int(np.ceil(annulus_px[1])) + 1
    cand_y, cand_x = np.nonzero(good & ~mask)
    keep = (cand_x > m) & (cand_x < nx - m - 1) & (cand_y > m) & (cand_y < ny - m - 1)
    cand_x, cand_y = cand_x[keep], cand_y[keep]
    if cand_x.size < 30:
        return 1.0
    pick = rng.choice(cand_x.size, min(n, cand_x.size), replace=False)
    ph = aperture_photometry(image, err, cand_x[pick].astype(float), cand_y[pick].astype(float),
                             psf, radius_px=radius_px, annulus_px=annulus_px)
    pull = ph.flux_jy / ph.flux_err_jy
    pull = pull[np.isfinite(pull)]
    mad = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    return float(max(mad, 0.5))


def extract_sources(cmos: fits.HDUList, cmap: fits.HDUList, *, snr_threshold: float = 5.0,
                    min_exposure_frac: float = 0.3, radius_arcsec: float | None = None,
                    ) -> fits.HDUList:
    """Detect and measure point sources on the CMOS FLUX row -> CPSL product.

    Columns: SOURCE, MAPINDEX (1-based CMAP FLUX row of the pointing nearest the source), RA,
    DEC (deg), RA_ERR, DEC_ERR (arcsec), X, Y (CMOS px, 0-based), FLUX, FLUX_ERR (Jy), SNR,
    APCORR, COVFRAC (covered fraction of the aperture's point-source flux), EXPOSURE (s).
    The aperture radius defaults to 2 array pixels.
    """
    h0 = cmos[0].header
    filt, lens = str(h0["FILTER"]), float(h0["LENS"])
    img, wcs = cmap_image(cmos, 0)
    err = cmap_image(cmos, 1)[0]
    expo = cmap_image(cmos, 2)[0]
    img = np.where(expo > 0, img, np.nan)
    ny, nx = img.shape
    wcs.pixel_shape = (nx, ny)
    d = cmap[1].data
    types = np.char.strip(np.asarray(d["TYPE"]).astype(str))
    flux_rows = np.nonzero(types == "FLUX")[0]
    _, awcs = cmap_image(cmap, int(flux_rows[0]))
    psf = effective_psf(filter_name=filt, lens_arcsec=lens, image_wcs=wcs, array_wcs=awcs)
    pix_arcsec = abs(float(wcs.wcs.cdelt[1])) * 3600.0
    radius = (2.0 * lens if radius_arcsec is None else radius_arcsec) / pix_arcsec
    annulus = (radius + lens / pix_arcsec, radius + 2.5 * lens / pix_arcsec)
    good = expo >= min_exposure_frac * expo.max()

    # Matched filter: the effective PSF sampled on the image grid.
    hk = int(np.ceil(2.0 * psf.fwhm_px))
    ky, kx = np.mgrid[-hk:hk + 1, -hk:hk + 1]
    kern = psf(kx.astype(float), ky.astype(float))
    kern /= kern.sum()
    sm = ndimage.convolve(np.where(good & np.isfinite(img), img, 0.0), kern, mode="constant")
    bkg = np.median(sm[good])
    rel_noise = np.sqrt(np.median(expo[good]) / np.maximum(expo, 1e-9))
    z = (sm - bkg) / rel_noise
    s0 = 1.4826 * np.median(np.abs(z[good] - np.median(z[good])))
    snr_map = z / s0
    peaks = (snr_map == ndimage.maximum_filter(snr_map, size=2 * round(psf.fwhm_px) + 1)) & good
    peaks &= snr_map > snr_threshold
    py, px = np.nonzero(peaks)
    srcmask = ndimage.binary_dilation(snr_map > 3.0, iterations=int(np.ceil(radius)))
    scale = random_aperture_noise(img, err, good, psf, radius_px=radius, annulus_px=annulus,
                                  mask=srcmask)
    fx = np.empty(px.size)
    fy = np.empty(px.size)
    for i, (x0, y0) in enumerate(zip(px, py, strict=True)):  # tens of sources
        fx[i], fy[i] = _fit_position(img, float(x0), float(y0), psf)
    ph = aperture_photometry(img, err, fx, fy, psf, radius_px=radius, annulus_px=annulus,
                             noise_scale=scale)
    ra, dec = wcs.wcs_pix2world(fx, fy, 0)
    snr = ph.flux_jy / ph.flux_err_jy
    fwhm_arcsec = psf.fwhm_px * pix_arcsec
    pos_err = fwhm_arcsec / (2.3548 * np.maximum(snr, 1.0)) + 0.3  # + systematic floor
    cra, cdec = np.asarray(d["CRVAL1"])[flux_rows], np.asarray(d["CRVAL2"])[flux_rows]
    dist = np.hypot((ra[:, None] - cra[None]) * np.cos(np.radians(dec[:, None])),
                    dec[:, None] - cdec[None])
    mapindex = flux_rows[np.argmin(dist, axis=1)] + 1 if ra.size else np.zeros(0, int)
    order = np.argsort(-ph.flux_jy)
    h = ic.carry(h0, root="CPSL")
    h["NSOURCES"] = (int(px.size), "point sources detected")
    h["SNRTHRES"] = (snr_threshold, "detection threshold (matched filter S/N)")
    h["APRADIUS"] = (round(radius * pix_arcsec, 3), "[arcsec] aperture radius")
    h["NOISESCL"] = (round(scale, 4), "random-aperture noise / FLUX_ERR prediction")
    h["PSFFWHM"] = (round(fwhm_arcsec, 3), "[arcsec] effective PSF FWHM")
    h["AARPSL"] = (VERSION, "version of the point-source step")
    h["INPUT"] = (str(h0["FILENAME"]), "detection image")
    cols = [
        fits.Column("SOURCE", "J", array=np.arange(1, px.size + 1)),
        fits.Column("MAPINDEX", "J", array=np.asarray(mapindex)[order]),
        fits.Column("RA", "D", unit="deg", array=ra[order]),
        fits.Column("DEC", "D", unit="deg", array=dec[order]),
        fits.Column("RA_ERR", "E", unit="arcsec", array=pos_err[order]),
        fits.Column("DEC_ERR", "E", unit="arcsec", array=pos_err[order]),
        fits.Column("X", "E", unit="pixel", array=fx[order]),
        fits.Column("Y", "E", unit="pixel", array=fy[order]),
        fits.Column("FLUX", "E", unit="Jy", array=ph.flux_jy[order]),
        fits.Column("FLUX_ERR", "E", unit="Jy", array=ph.flux_err_jy[order]),
        fits.Column("SNR", "E", array=snr[order]),
        fits.Column("APCORR", "E", array=ph.aperture_correction[order]),
        fits.Column("COVFRAC", "E", array=ph.coverage[order]),
        fits.Column("EXPOSURE", "E", unit="s",
                    array=expo[np.rint(fy).astype(int), np.rint(fx).astype(int)][order]),
    ]
    return ic.table_product(h, cols, root="CPSL")


def forced_photometry(cmos: fits.HDUList, cmap: fits.HDUList, ra_deg: NDArray, dec_deg: NDArray,
                      *, noise_scale: float = 1.0, radius_arcsec: float | None = None
                      ) -> Photometry:
    """Aperture photometry at given sky positions on the CMOS FLUX row (same settings as
    `extract_sources`; pass the CPSL NOISESCL as `noise_scale` for comparable errors)."""
    h0 = cmos[0].header
    lens = float(h0["LENS"])
    img, wcs = cmap_image(cmos, 0)
    err, expo = cmap_image(cmos, 1)[0], cmap_image(cmos, 2)[0]
    img = np.where(expo > 0, img, np.nan)
    wcs.pixel_shape = (img.shape[1], img.shape[0])
    types = np.char.strip(np.asarray(cmap[1].data["TYPE"]).astype(str))
    _, awcs = cmap_image(cmap, int(np.nonzero(types == "FLUX")[0][0]))
    psf = effective_psf(filter_name=str(h0["FILTER"]), lens_arcsec=lens, image_wcs=wcs,
                        array_wcs=awcs)
    pix_arcsec = abs(float(wcs.wcs.cdelt[1])) * 3600.0
    radius = (2.0 * lens if radius_arcsec is None else radius_arcsec) / pix_arcsec
    annulus = (radius + lens / pix_arcsec, radius + 2.5 * lens / pix_arcsec)
    x, y = wcs.wcs_world2pix(np.asarray(ra_deg), np.asarray(dec_deg), 0)
    return aperture_photometry(img, err, x, y, psf, radius_px=radius, annulus_px=annulus,
                               noise_scale=noise_scale)
