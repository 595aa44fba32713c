"""Forced PSF photometry on BCD frames at given sky positions: fluxes and flux upper limits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from services.extract.prfmodel import SkyPsf
from shared.bcd import BCDFrame
from shared.instruments import mips

#: The convention of the limit, stated in the output table's meta (ULCONV).
UPPER_LIMIT_CONVENTION = "ulim = max(flux, 0) + nsigma * delta_flux (forced PSF fit on BCDs)"


class UpperLimitError(ValueError):
    """Inputs of forced photometry are inconsistent (shapes, units, WCS)."""


def _frame_pixel_area_arcsec2(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local pixel solid angle (arcsec^2) from the full (SIP-distorted) WCS, by finite
    differences of the sky position across one pixel."""
    ra0, dec0 = wcs.all_pix2world(x, y, 0)
    ra1, dec1 = wcs.all_pix2world(x + 1.0, y, 0)
    ra2, dec2 = wcs.all_pix2world(x, y + 1.0, 0)
    cosd = np.cos(np.radians(dec0))
    dxa = ((ra1 - ra0 + 180.0) % 360.0 - 180.0) * cosd * 3600.0
    dxd = (dec1 - dec0) * 3600.0
    dya = ((ra2 - ra0 + 180.0) % 360.0 - 180.0) * cosd * 3600.0
    dyd = (dec2 - dec0) * 3600.0
    return np.abs(dxa * dyd - dxd * dya)


def forced_upper_limits(
    ra: np.ndarray | Sequence[float],
    dec: np.ndarray | Sequence[float],
    frames: Sequence[BCDFrame],
    *,
    fwhm_arcsec: float,
    nsigma: float = 3.0,
    fatal_bits: int = mips.FATAL_BITS,
    fit_background: bool = True,
    half_size_fwhm: float = 2.5,
    min_psf_fraction: float = 0.6,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
    psf: SkyPsf | None = None,
) -> Table:
    """Forced PSF-weighted photometry at (ra, dec) (degrees) on every BCD frame covering it.

    `neighbours` (ra, dec in degrees: e.g. every position detected in any band) are fitted
    jointly with the targets in each frame, so that a confused neighbour's light is not taken
    for the target's or for the local sky (prior-based deblending, as 70 um photometry on 24 um
    positions does). Without it each target is fitted alone.

    In each frame the PSF (`psf`: the extraction's, e.g. the diffraction pattern it chose;
    default the pixel-integrated Gaussian of `fwhm_arcsec`) is placed at the position
    (full TAN-SIP WCS) and its amplitude fitted by weighted least squares (weights 1/unc^2,
    pixels with any `fatal_bits` or non-finite values ignored), together with a constant local
    background when `fit_background` (BCDs are not sky-subtracted), on the pixels within
    `half_size_fwhm` FWHM. A frame counts when the good pixels hold at least `min_psf_fraction`
    of the PSF. Frame fluxes (uJy, using each frame's local pixel solid angle; data in MJy/sr)
    are combined with inverse-variance weights.

    Limit convention: ulim = max(flux, 0) + nsigma * delta_flux, in uJy (also in meta ULCONV).

    Returns a Table with ra, dec, flux (uJy), delta_flux (uJy), snr, ulim (uJy, NaN where no
    frame covers the source), n_frames. Vectorised over sources; one pass per frame.
    """
    ra_a = np.atleast_1d(np.asarray(ra, dtype=float))
    dec_a = np.atleast_1d(np.asarray(dec, dtype=float))
    if ra_a.shape != dec_a.shape or ra_a.ndim != 1:
        raise UpperLimitError(f"ra and dec must be 1-D of one length, got {ra_a.shape}, "
                              f"{dec_a.shape}")
    if not fwhm_arcsec or fwhm_arcsec <= 0:
        raise UpperLimitError(f"fwhm_arcsec must be > 0, got {fwhm_arcsec}")
    sky_psf = psf if psf is not None else SkyPsf(fwhm_arcsec)
    n = ra_a.size
    sum_w = np.zeros(n)
    sum_wf = np.zeros(n)
    n_used = np.zeros(n, dtype=np.int32)
    if neighbours is not None:
        # Neighbours closer than FWHM/3 to a target are the target itself (or unresolvable).
        nra, ndec = (np.atleast_1d(np.asarray(v, dtype=float)) for v in neighbours)
        if nra.size and n:
            cosd = np.cos(np.radians(dec_a))[None, :]
            sep = np.hypot((nra[:, None] - ra_a[None, :]) * cosd,
                           ndec[:, None] - dec_a[None, :]) * 3600.0
            keep = sep.min(axis=1) > fwhm_arcsec / 3.0
            nra, ndec = nra[keep], ndec[keep]
        ra_fit, dec_fit = np.concatenate([ra_a, nra]), np.concatenate([dec_a, ndec])
    for frame in frames:
        if neighbours is not None:
            _accumulate_frame_joint(frame, ra_fit, dec_fit, n, sum_w, sum_wf, n_used,
                                    fwhm_arcsec=fwhm_arcsec, psf=sky_psf,
                                    fatal_bits=fatal_bits, half_size_fwhm=half_size_fwhm,
                                    min_psf_fraction=min_psf_fraction)
            continue
        _accumulate_frame(frame, ra_a, dec_a, sum_w, sum_wf, n_used, fwhm_arcsec=fwhm_arcsec,
                          psf=sky_psf, fatal_bits=fatal_bits, fit_background=fit_background,
                          half_size_fwhm=half_size_fwhm, min_psf_fraction=min_psf_fraction)
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(sum_w > 0, sum_wf / sum_w, np.nan)
        dflux = np.where(sum_w > 0, 1.0 / np.sqrt(sum_w), np.nan)
    ulim = np.maximum(flux, 0.0) + nsigma * dflux
    t = Table()
    t["ra"] = ra_a
    t["ra"].unit = "deg"
    t["dec"] = dec_a
    t["dec"].unit = "deg"
    t["flux"] = flux
    t["flux"].unit = "uJy"
    t["delta_flux"] = dflux
    t["delta_flux"].unit = "uJy"
    with np.errstate(divide="ignore", invalid="ignore"):
        t["snr"] = flux / dflux
    t["ulim"] = ulim
    t["ulim"].unit = "uJy"
    t["n_frames"] = n_used
    t.meta.update({"ULCONV": UPPER_LIMIT_CONVENTION, "NSIGMA": nsigma, "FWHM": fwhm_arcsec,
                   "PRFMODEL": "Gaussian" if sky_psf.is_gaussian else "obscured Airy"})
    return t


def _frame_arrays(frame: BCDFrame) -> tuple[np.ndarray, np.ndarray]:
    """A frame's data and unc as float64, after checking the arrays' shapes."""
    if not frame.has_consistent_arrays:
        raise UpperLimitError(
            f"frame {frame.key or '(memory)'}: data, unc and mask shapes differ or are not 2-D"
        )
    return np.asarray(frame.data, dtype=float), np.asarray(frame.unc, dtype=float)


def _accumulate_frame(
    frame: BCDFrame,
    ra: np.ndarray,
    dec: np.ndarray,
    sum_w: np.ndarray,
    sum_wf: np.ndarray,
    n_used: np.ndarray,
    *,
    fwhm_arcsec: float,
    psf: SkyPsf,
    fatal_bits: int,
    fit_background: bool,
    half_size_fwhm: float,
    min_psf_fraction: float,
) -> None:
    """Add one frame's forced PSF fits (as inverse-variance sums) for the sources it covers."""
    data, unc = _frame_arrays(frame)
    ny, nx = data.shape
    wcs = frame.wcs
    x, y = wcs.all_world2pix(ra, dec, 0)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    inside = np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (
        y < ny - 0.5)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return
    x, y = x[idx], y[idx]
    area = _frame_pixel_area_arcsec2(wcs, x, y)
    pix = np.sqrt(area)
    h = max(2, math.ceil(half_size_fwhm * fwhm_arcsec / float(np.min(pix))))
    off = np.arange(-h, h + 1)
    cx = np.round(x).astype(np.int64)
    cy = np.round(y).astype(np.int64)
    px = cx[:, None] + off
    py = cy[:, None] + off
    # (k, s, s): fraction of the flux in each pixel
    prof = psf.stamps(x, y, px[:, 0], py[:, 0], off.size, pix)[0]
    inx = (px >= 0) & (px < nx)
    iny = (py >= 0) & (py < ny)
    ok = iny[:, :, None] & inx[:, None, :]
    yy = np.clip(py, 0, ny - 1)[:, :, None]
    xx = np.clip(px, 0, nx - 1)[:, None, :]
    d = data[yy, xx]
    e = unc[yy, xx]
    good = ok & frame.usable_pixels(fatal_bits)[yy, xx]
    # Surface brightness (MJy/sr) -> uJy in each pixel, with the frame's local solid angle.
    ujy = (1e12 * mips.SR_PER_ARCSEC2 * area)[:, None, None]
    w = np.where(good, 1.0 / np.where(good, e * ujy, 1.0) ** 2, 0.0)
    d = np.where(good, d * ujy, 0.0)
    p = np.where(good, prof, 0.0)
    # Weighted linear least squares for (flux, sky) per source: 2x2 normal equations.
    spp = np.sum(w * p * p, axis=(1, 2))
    sp1 = np.sum(w * p, axis=(1, 2))
    s11 = np.sum(w, axis=(1, 2))
    spd = np.sum(w * p * d, axis=(1, 2))
    s1d = np.sum(w * d, axis=(1, 2))
    if fit_background:
        det = spp * s11 - sp1 * sp1
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (s11 * spd - sp1 * s1d) / det
            var = s11 / det
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            f = spd / spp
            var = 1.0 / spp
    covered = (np.sum(p, axis=(1, 2)) >= min_psf_fraction) & np.isfinite(f) & np.isfinite(var)
    covered &= var > 0
    sel = idx[covered]
    np.add.at(sum_w, sel, 1.0 / var[covered])
    np.add.at(sum_wf, sel, f[covered] / var[covered])
    np.add.at(n_used, sel, 1)


def _accumulate_frame_joint(
    frame: BCDFrame,
    ra: np.ndarray,
    dec: np.ndarray,
    n_targets: int,
    sum_w: np.ndarray,
    sum_wf: np.ndarray,
    n_used: np.ndarray,
    *,
    fwhm_arcsec: float,
    psf: SkyPsf,
    fatal_bits: int,
    half_size_fwhm: float,
    min_psf_fraction: float,
) -> None:
    """One frame's joint forced fit: PSF amplitudes of every source on the frame (the first
    `n_targets` are the targets) plus a sky plane, weighted least squares over the pixels of
    their stamps; the targets' fluxes and marginal variances are accumulated."""
    from scipy import sparse

    data, unc = _frame_arrays(frame)
    ny, nx = data.shape
    wcs = frame.wcs
    x, y = (np.asarray(v, dtype=float) for v in wcs.all_world2pix(ra, dec, 0))
    pix_area = _frame_pixel_area_arcsec2(wcs, np.array([nx / 2.0]), np.array([ny / 2.0]))[0]
    pix = math.sqrt(pix_area)
    h = max(2, math.ceil(half_size_fwhm * fwhm_arcsec / pix))
    near = np.isfinite(x) & np.isfinite(y) & (x > -h) & (x < nx - 1 + h) & (y > -h) & (
        y < ny - 1 + h)
    src = np.flatnonzero(near)
    if not np.any(src < n_targets):
        return
    x, y = x[src], y[src]
    off = np.arange(-h, h + 1)
    px = np.round(x).astype(np.int64)[:, None] + off
    py = np.round(y).astype(np.int64)[:, None] + off
    prof = psf.stamps(x, y, px[:, 0], py[:, 0], off.size, np.full(x.size, pix))[0]
    inside = ((py >= 0) & (py < ny))[:, :, None] & ((px >= 0) & (px < nx))[:, None, :]
    pix_index = (np.clip(py, 0, ny - 1)[:, :, None] * nx + np.clip(px, 0, nx - 1)[:, None, :])
    good_pix = frame.usable_pixels(fatal_bits).ravel()
    ok = inside & good_pix[pix_index]
    k = src.size
    rows = pix_index[ok]
    cols = np.broadcast_to(np.arange(k)[:, None, None], prof.shape)[ok]
    vals = prof[ok]
    # Pixels used: the union of the stamps; the sky is one more column.
    used, row_pos = np.unique(rows, return_inverse=True)
    # The sky is a plane over the frame (a BCD is not sky-subtracted, and the sky slopes).
    uy, ux = (used // nx - ny / 2.0) / ny, (used % nx - nx / 2.0) / nx
    sky = sparse.csr_matrix(np.column_stack([np.ones(used.size), ux, uy]))
    psfs = sparse.csr_matrix((vals, (row_pos, cols)), shape=(used.size, k))
    design = sparse.hstack([psfs, sky], format="csr")
    ujy = 1e12 * mips.SR_PER_ARCSEC2 * pix_area
    d = data.ravel()[used] * ujy
    w = 1.0 / (unc.ravel()[used] * ujy) ** 2
    normal = (design.T @ sparse.diags(w) @ design).toarray()
    rhs = design.T @ (w * d)
    # A whisper of ridge keeps unresolvable (coincident) neighbours from making it singular.
    ridge = 1e-9 * np.trace(normal) / (k + 3)
    try:
        cov = np.linalg.inv(normal + ridge * np.eye(k + 3))
    except np.linalg.LinAlgError:
        return
    amp = cov @ rhs
    var = np.diag(cov)[:k]
    covered_frac = np.bincount(cols, weights=vals, minlength=k)
    tgt = np.flatnonzero((src < n_targets) & (covered_frac >= min_psf_fraction)
                         & np.isfinite(amp[:k]) & (var > 0))
    sel = src[tgt]
    np.add.at(sum_w, sel, 1.0 / var[tgt])
    np.add.at(sum_wf, sel, amp[tgt] / var[tgt])
    np.add.at(n_used, sel, 1)
