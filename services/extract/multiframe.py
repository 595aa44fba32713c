"""Multiframe PRF photometry: refine mosaic detections by fitting the BCD frames themselves.

When the mosaic oversamples its frames (MIPS 70 um: 9.98" BCD pixels on a 4" mosaic grid),
the point-source profile in the mosaic depends on each source's dither phases and on the
drizzle kernel, so a single mosaic PRF fits it only approximately: positions scatter by
~0.3" and fluxes by ~2% even without noise. APEX's "multiframe" mode (Spitzer MOPEX) avoids
this by fitting every source on the individual BCDs, where the model is exact: the PSF
integrated over each BCD pixel, placed through that frame's own TAN-SIP WCS.

`refine_on_frames` does that for all sources at once: unknowns are each source's flux and
(east, north) offset, shared by all frames, plus a sky plane per frame (BCDs are not
sky-subtracted); the model is linearised around the current positions and solved by weighted
least squares (Gauss-Newton, a few iterations), with every source in the fit so that
neighbours are deblended. Uncertainties come from the inverse normal matrix, each source's
scaled by the reduced chi-square of its own stamps when it exceeds 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import sparse
from scipy.sparse import linalg as splinalg

from services.extract.photometry import (
    gaussian_aperture_correction,
    vega_magnitude,
    wcs_pixel_scale_arcsec,
)
from services.extract.prfmodel import SkyPsf
from shared import fitsio
from shared.bcd import BCDFrame
from shared.instruments import mips

#: uJy per (MJy/sr x arcsec^2).
_UJY_PER_MJYSR_ARCSEC2 = 1e12 * mips.SR_PER_ARCSEC2


class MultiframeError(ValueError):
    """Inputs of the multiframe fit are inconsistent (lengths, shapes, FWHM)."""


@dataclass(frozen=True, slots=True)
class MultiframeFit:
    """Result of `refine_on_frames`, one entry per input source.

    Positions in degrees, their uncertainties in arcsec (east = along RA*cos(Dec)); fluxes in
    uJy. `converged` is False where the fit was not trusted (no frame, flux <= 0 or a position
    that wandered more than `max_shift_fwhm`): those sources keep their input values.
    """

    ra: np.ndarray
    dec: np.ndarray
    delta_east_arcsec: np.ndarray
    delta_north_arcsec: np.ndarray
    flux: np.ndarray
    delta_flux: np.ndarray
    n_frames: np.ndarray
    chi2_dof: float
    converged: np.ndarray


@dataclass(frozen=True, slots=True)
class _FrameGeometry:
    """What one frame needs for every iteration: data, weights and the WCS."""

    wcs: WCS
    data: np.ndarray  #: MJy/sr, flat
    weight: np.ndarray  #: 1/unc^2 (0 for bad pixels), flat
    shape: tuple[int, int]
    pix_arcsec: float


def mosaic_oversamples_frames(frames: Sequence[BCDFrame], mosaic_pixel_arcsec: float,
                              *, factor: float = 1.8) -> bool:
    """True when the frames' pixels are >= `factor` x the mosaic pixel (where a multiframe fit
    recovers what the mosaic's resampling blurs)."""
    if not frames or mosaic_pixel_arcsec <= 0:
        return False
    return wcs_pixel_scale_arcsec(frames[0].wcs) >= factor * mosaic_pixel_arcsec


def _shift(ra: np.ndarray, dec: np.ndarray, east: np.ndarray, north: np.ndarray,
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) moved by (east, north) arcsec (small offsets)."""
    dec2 = dec + north / 3600.0
    return (ra + east / 3600.0 / np.cos(np.radians(dec))) % 360.0, dec2


def _frame_geometry(frame: BCDFrame, fatal_bits: int) -> _FrameGeometry:
    if not frame.has_consistent_arrays:
        raise MultiframeError(f"frame {frame.key or '(memory)'}: data, unc and mask shapes "
                              "differ or are not 2-D")
    data = np.asarray(frame.data, dtype=float)
    unc = np.asarray(frame.unc, dtype=float)
    good = frame.usable_pixels(fatal_bits)
    weight = np.where(good, 1.0 / np.where(good, unc, 1.0) ** 2, 0.0)
    wcs = frame.wcs
    return _FrameGeometry(wcs, np.where(good, data, 0.0).ravel(), weight.ravel(),
                          (int(data.shape[0]), int(data.shape[1])), wcs_pixel_scale_arcsec(wcs))


def refine_on_frames(
    ra: np.ndarray | Sequence[float],
    dec: np.ndarray | Sequence[float],
    flux_ujy: np.ndarray | Sequence[float],
    frames: Sequence[BCDFrame],
    *,
    fwhm_arcsec: float,
    fatal_bits: int = mips.FATAL_BITS,
    half_size_fwhm: float = 1.5,
    iterations: int = 5,
    max_shift_fwhm: float = 0.5,
    clip_sigma: float = 5.0,
    psf: SkyPsf | None = None,
) -> MultiframeFit:
    """Fit flux and position of every source on all `frames` at once (APEX multiframe).

    `ra`, `dec` (degrees) and `flux_ujy` are the starting values (e.g. the mosaic PRF fit);
    `fwhm_arcsec` is the PSF's (not the mosaic's: no resampling broadening), the model a
    pixel-integrated Gaussian of it (or `psf`, e.g. the diffraction pattern the mosaic's
    extraction chose) in each frame's pixels through the frame's full WCS, on the
    pixels within `half_size_fwhm` FWHM of each source. Pixels with `fatal_bits` or
    non-finite values are ignored; once the model has converged (third iteration) pixels
    deviating by more than `clip_sigma` times the residuals' robust sigma (at least the stated
    unc) from it (residual cosmic rays) are dropped too. A per-frame sky
    plane is fitted with the sources. Data in MJy/sr; fluxes use each frame's local pixel
    solid angle.
    """
    ra0 = np.atleast_1d(np.asarray(ra, dtype=float))
    dec0 = np.atleast_1d(np.asarray(dec, dtype=float))
    f0 = np.atleast_1d(np.asarray(flux_ujy, dtype=float))
    if not (ra0.shape == dec0.shape == f0.shape) or ra0.ndim != 1:
        raise MultiframeError("ra, dec and flux_ujy must be 1-D arrays of one length")
    if not fwhm_arcsec or fwhm_arcsec <= 0:
        raise MultiframeError(f"fwhm_arcsec must be > 0, got {fwhm_arcsec}")
    n = ra0.size
    geoms = [_frame_geometry(f, fatal_bits) for f in frames]
    nf = len(geoms)
    unconverged = MultiframeFit(ra0, dec0, np.full(n, np.nan), np.full(n, np.nan), f0,
                                np.full(n, np.nan), np.zeros(n, np.int32), math.nan,
                                np.zeros(n, bool))
    if n == 0 or nf == 0:
        return unconverged
    east = np.zeros(n)
    north = np.zeros(n)
    flux = np.where(np.isfinite(f0) & (f0 > 0), f0, 0.0)
    sky_psf = psf if psf is not None else SkyPsf(fwhm_arcsec)
    clip: list[np.ndarray | None] = [None] * nf
    cov_diag = np.full(3 * n, np.nan)
    n_frames = np.zeros(n, np.int32)
    chi2_dof = math.nan
    for it in range(iterations):
        cur_ra, cur_dec = _shift(ra0, dec0, east, north)
        build = functools.partial(_linear_system, geoms, cur_ra, cur_dec, flux,
                                  psf=sky_psf, half_size_fwhm=half_size_fwhm,
                                  fwhm_arcsec=fwhm_arcsec)
        system = build(clip=clip)
        if system is not None and it == min(2, iterations - 1):
            # Once the model has converged (two iterations), drop the pixels it cannot explain
            # (residual cosmic rays), in units of the residuals' robust scale and never below
            # the stated unc, and rebuild the system without them.
            clip = _outlier_masks(system[5], clip_sigma)
            system = build(clip=clip)
        if system is None:
            return unconverged
        normal, rhs, chi2, ndata, n_frames, _resid_z, src_chi2, src_npix = system
        npar = normal.shape[0]
        # A whisper of ridge: sources no frame constrains (or exact duplicates) stay finite.
        diag = normal.diagonal()
        ridge = sparse.diags(np.where(diag > 0, 1e-10 * diag, 1.0))
        try:
            lu = splinalg.splu((normal + ridge).tocsc())
        except RuntimeError:
            return unconverged
        step = lu.solve(np.asarray(rhs, dtype=float))
        d_flux, d_east, d_north = step[:n], step[n : 2 * n], step[2 * n : 3 * n]
        # Damping: no position step beyond a quarter of the FWHM per iteration.
        lim = 0.25 * fwhm_arcsec
        scale = np.minimum(1.0, lim / np.maximum(np.hypot(d_east, d_north), 1e-12))
        flux = flux + d_flux
        east = east + scale * d_east
        north = north + scale * d_north
        chi2_dof = chi2 / max(ndata - npar, 1)
        if it == iterations - 1:
            cov_diag = _inverse_diagonal(lu, npar, 3 * n)
    # Each source's uncertainties are scaled by the reduced chi^2 of its own stamps (APEX's
    # per-source chi^2 scaling, when > 1), not by the whole fit's: a few bright sources the
    # PSF model misses, or a source off the list on some frames, raise the global chi^2 and
    # would inflate every other source's uncertainty with it (70 um, one simulated sky:
    # chi^2/dof 1.92, the faint sources' errors then 0.87x their stated uncertainties).
    with np.errstate(divide="ignore", invalid="ignore"):
        local = np.where(src_npix > 3, src_chi2 / np.maximum(src_npix - 3, 1), 1.0)
    noise_scale = np.sqrt(np.maximum(np.nan_to_num(local, nan=1.0), 1.0))
    err = np.sqrt(np.clip(cov_diag, 0.0, None)) * np.tile(noise_scale, 3)
    new_ra, new_dec = _shift(ra0, dec0, east, north)
    ok = ((n_frames > 0) & np.isfinite(flux) & (flux > 0) & np.isfinite(east) & np.isfinite(north)
          & (np.hypot(east, north) <= max_shift_fwhm * fwhm_arcsec) & np.all(np.isfinite(
              err.reshape(3, n)), axis=0))
    return MultiframeFit(
        ra=np.where(ok, new_ra, ra0),
        dec=np.where(ok, new_dec, dec0),
        delta_east_arcsec=np.where(ok, err[n : 2 * n], np.nan),
        delta_north_arcsec=np.where(ok, err[2 * n :], np.nan),
        flux=np.where(ok, flux, f0),
        delta_flux=np.where(ok, err[:n], np.nan),
        n_frames=n_frames,
        chi2_dof=float(chi2_dof),
        converged=ok,
    )


def _inverse_diagonal(lu: splinalg.SuperLU, size: int, first: int, chunk: int = 256,
                      ) -> np.ndarray:
    """The first `first` diagonal entries of the inverse of the factored matrix (the source
    parameters' variances), solving for identity columns in chunks: never the dense inverse."""
    out = np.empty(first)
    for start in range(0, first, chunk):
        stop = min(start + chunk, first)
        cols = np.zeros((size, stop - start))
        cols[np.arange(start, stop), np.arange(stop - start)] = 1.0
        out[start:stop] = lu.solve(cols)[np.arange(start, stop), np.arange(stop - start)]
    return out


def _frame_pixels(g: _FrameGeometry, clip: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                             np.ndarray]:
    """A frame's usable pixels (flat indices; not flagged, not clipped) with their weights,
    data, the sky plane's basis (1, x, y in normalised pixel coordinates), the weighted basis
    and the plane's 3x3 normal matrix. (Not kept across iterations: for thousands of frames
    that would hold ~70 bytes per pixel, for no measurable gain.)"""
    ny, nx = g.shape
    usable = g.weight > 0
    if clip is not None:
        usable &= ~clip
    used = np.flatnonzero(usable)
    basis = np.column_stack([np.ones(used.size), (used % nx - nx / 2.0) / nx,
                             (used // nx - ny / 2.0) / ny])
    w = g.weight[used]
    wb = basis * w[:, None]
    return used, w, g.data[used], basis, wb, basis.T @ wb


_System = tuple[sparse.csr_matrix, np.ndarray, float, int, np.ndarray, list[np.ndarray | None],
                np.ndarray, np.ndarray]


def _outlier_masks(resid_z: list[np.ndarray | None], clip_sigma: float,
                   ) -> list[np.ndarray | None]:
    """Per frame, the pixels whose residual exceeds `clip_sigma` x the residuals' robust
    scale (at least 1: the stated unc)."""
    zs = np.concatenate([np.abs(z[z != 0]) for z in resid_z if z is not None] or [np.zeros(0)])
    scale = max(1.0, 1.4826 * float(np.median(zs))) if zs.size else 1.0
    return [np.abs(z) > clip_sigma * scale if z is not None else None for z in resid_z]


def _linear_system(
    geoms: Sequence[_FrameGeometry],
    ra: np.ndarray,
    dec: np.ndarray,
    flux: np.ndarray,
    *,
    psf: SkyPsf,
    half_size_fwhm: float,
    fwhm_arcsec: float,
    clip: list[np.ndarray | None],
) -> _System | None:
    """Normal equations (J^T W J, J^T W r) of the linearised model over all frames.

    Parameter order: flux (n), east (n), north (n), then (a, b, c) of each frame's sky plane.
    Returns also chi^2 of the current model, the number of data, frames per source and each
    frame's residuals in sigma (for clipping).
    """
    n = ra.size
    nf = len(geoms)
    rows_all: list[np.ndarray] = []
    cols_all: list[np.ndarray] = []
    vals_all: list[np.ndarray] = []
    resid_all: list[np.ndarray] = []
    weight_all: list[np.ndarray] = []
    resid_z: list[np.ndarray | None] = [None] * nf
    n_frames = np.zeros(n, np.int32)
    src_chi2 = np.zeros(n)  # each source's stamps: chi^2 and number of pixels
    src_npix = np.zeros(n)
    row0 = 0  # sparse rows so far (stamp pixels)
    ndata = 0  # good pixels so far (every one enters chi^2 and the sky planes)
    chi2 = 0.0
    sky_rows: list[np.ndarray] = []
    sky_blocks: list[np.ndarray] = []
    sky_rhs: list[np.ndarray] = []
    step_as = 0.5  # arcsec, for the WCS Jacobian
    for j, g in enumerate(geoms):
        ny, nx = g.shape
        x, y = (np.asarray(v, dtype=float) for v in g.wcs.all_world2pix(ra, dec, 0))
        h = max(2, math.ceil(half_size_fwhm * fwhm_arcsec / g.pix_arcsec))
        near = (np.isfinite(x) & np.isfinite(y) & (x > -0.5 - h) & (x < nx - 0.5 + h)
                & (y > -0.5 - h) & (y < ny - 0.5 + h))
        src = np.flatnonzero(near)
        if src.size == 0:
            continue
        x, y = x[src], y[src]
        # d(x, y)/d(east, north) by finite differences through the full WCS.
        re, de = _shift(ra[src], dec[src], np.full(src.size, step_as), np.zeros(src.size))
        rn, dn = _shift(ra[src], dec[src], np.zeros(src.size), np.full(src.size, step_as))
        xe, ye = (np.asarray(v, dtype=float) for v in g.wcs.all_world2pix(re, de, 0))
        xn, yn = (np.asarray(v, dtype=float) for v in g.wcs.all_world2pix(rn, dn, 0))
        dxde, dyde = (xe - x) / step_as, (ye - y) / step_as
        dxdn, dydn = (xn - x) / step_as, (yn - y) / step_as
        area = np.abs(dxde * dydn - dxdn * dyde)  # pixels per arcsec^2
        pix = 1.0 / np.sqrt(area)  # local pixel side, arcsec
        to_sb = area / _UJY_PER_MJYSR_ARCSEC2  # uJy in one pixel -> MJy/sr
        off = np.arange(-h, h + 1)
        px = np.round(x).astype(np.int64)[:, None] + off
        py = np.round(y).astype(np.int64)[:, None] + off
        # The PSF and its derivatives in the centre's x and y, in MJy/sr per uJy.
        prof, dpx, dpy = (v * to_sb[:, None, None] for v in
                          psf.stamps(x, y, px[:, 0], py[:, 0], off.size, pix))
        inside = ((py >= 0) & (py < ny))[:, :, None] & ((px >= 0) & (px < nx))[:, None, :]
        pidx = np.clip(py, 0, ny - 1)[:, :, None] * nx + np.clip(px, 0, nx - 1)[:, None, :]
        good = inside & (g.weight[pidx] > 0)
        if clip[j] is not None:
            good &= ~clip[j][pidx]  # type: ignore[index]
        k = src.size
        f = flux[src][:, None, None]
        d_east = f * (dpx * dxde[:, None, None] + dpy * dyde[:, None, None])
        d_north = f * (dpx * dxdn[:, None, None] + dpy * dydn[:, None, None])
        # A source counts for this frame when the good pixels hold most of its PSF.
        frac = np.sum(np.where(good, prof, 0.0), axis=(1, 2)) / to_sb
        n_frames[src[frac >= 0.6]] += 1
        pix_flat = pidx[good]
        # Every good pixel of the frame enters the sky plane's fit (so that its slope is set
        # by the whole frame and does not trade off against source positions), but only the
        # stamps' pixels carry source derivatives: those are the sparse rows; the rest of the
        # frame adds to its 3x3 sky block and sky right-hand side, summed densely (the same
        # normal equations as one row per pixel, without the rows).
        used, w, data, basis, wb, sky_normal = _frame_pixels(g, clip[j])
        local = np.searchsorted(used, pix_flat)
        which = np.broadcast_to(np.arange(k)[:, None, None], good.shape)[good]
        model = np.bincount(local, weights=(f * prof)[good], minlength=used.size)
        # Current sky: a weighted linear fit of data - sources (keeps the residual honest).
        try:
            coef = np.linalg.solve(sky_normal, wb.T @ (data - model))
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(sky_normal, wb.T @ (data - model), rcond=None)[0]
        sources_model = model
        resid = data - (sources_model + basis @ coef)
        full_z = np.zeros(ny * nx)
        # Residuals in sigma, tolerating a PSF mismatch of 10% of the source model (a bright
        # core is not an outlier because the PRF is imperfect).
        full_z[used] = resid * np.sqrt(w / (1.0 + w * (0.1 * sources_model) ** 2))
        resid_z[j] = full_z
        src_chi2 += np.bincount(src[which], weights=(w * resid * resid)[local], minlength=n)
        src_npix += np.bincount(src[which], minlength=n)
        stamp_px, row = np.unique(local, return_inverse=True)
        rows = row0 + row
        sky_cols = 3 * n + 3 * j + np.arange(3)
        rows_all += [rows, rows, rows]
        cols_all += [src[which], n + src[which], 2 * n + src[which]]
        vals_all += [prof[good], d_east[good], d_north[good]]
        stamp_rows = row0 + np.arange(stamp_px.size)
        rows_all += [stamp_rows] * 3
        cols_all += [np.full(stamp_px.size, c) for c in sky_cols]
        vals_all += [basis[stamp_px, 0], basis[stamp_px, 1], basis[stamp_px, 2]]
        resid_all.append(resid[stamp_px])
        weight_all.append(w[stamp_px])
        # The frame's pixels off the stamps: their share of the sky block and right-hand side
        # (the whole frame's minus the stamps').
        sky_rows.append(sky_cols)
        sky_blocks.append(sky_normal - basis[stamp_px].T @ wb[stamp_px])
        sky_rhs.append(wb.T @ resid - wb[stamp_px].T @ resid[stamp_px])
        chi2 += float(np.sum(w * resid * resid))
        ndata += used.size
        row0 += stamp_px.size
    if ndata == 0:
        return None
    npar = 3 * n + 3 * nf
    jac = sparse.csr_matrix(
        (np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
        shape=(row0, npar),
    )
    w = np.concatenate(weight_all)
    r = np.concatenate(resid_all)
    jw = jac.T.multiply(w).tocsr()
    sky_idx = np.concatenate(sky_rows)
    blocks = np.stack(sky_blocks)  # (frames with pixels, 3, 3)
    off_stamp = sparse.csr_matrix(
        (blocks.ravel(), (np.repeat(sky_idx, 3), np.tile(sky_idx.reshape(-1, 3), 3).ravel())),
        shape=(npar, npar))
    normal = (jw @ jac + off_stamp).tocsr()
    rhs = np.asarray(jw @ r).ravel()
    rhs[sky_idx] += np.concatenate(sky_rhs)
    # The sky was re-fitted above: its step is a correction around that fit.
    return normal, rhs, chi2, int(ndata), n_frames, resid_z, src_chi2, src_npix


def frames_psf_fwhm(table_fwhm_arcsec: float, band: mips.MipsBand | None, *,
                    frame_pixel_arcsec: float, mosaic_pixel_arcsec: float) -> float:
    """The PSF FWHM to fit on the frames: the band's calibrated PSF when it is a known MIPS
    band, else the mosaic's measured FWHM with the resampling broadening (a box of the frame
    pixel and one of the mosaic pixel, variance p^2/12 each) taken out."""
    if band is not None:
        return band.psf_fwhm_arcsec
    k = 8.0 * math.log(2.0) / 12.0
    f2 = table_fwhm_arcsec**2 - k * (frame_pixel_arcsec**2 + mosaic_pixel_arcsec**2)
    return math.sqrt(f2) if f2 > 0 else table_fwhm_arcsec


def refine_source_table(table: Table, frames: Sequence[BCDFrame], header: fits.Header, *,
                        band: mips.MipsBand | None, fatal_bits: int = mips.FATAL_BITS) -> Table:
    """`extract_sources`'s table with PRF fluxes and positions replaced by the multiframe fit
    on `frames` (the BCDs the mosaic `header` was made from); aperture fluxes stay. Meta gains
    PRFMODE = 'MULTIFRAME', MFFWHM (the PSF FWHM fitted, arcsec), MFCHI2 and MFNCONV (sources
    refined; the others keep their mosaic values). The PSF on the frames is the table's
    (PRFMODEL: the Gaussian or the diffraction pattern); a table fitted with a PRF file is
    returned unchanged (meta MFSKIP), its BCD-level counterpart being unknown."""
    out = table.copy()
    if len(out) == 0 or not frames:
        return out
    if out.meta.get("PRFMODEL", "Gaussian") not in ("Gaussian", "obscured Airy"):
        # A PRF given as a file is the mosaic's: its counterpart on the BCDs is not known.
        out.meta["MFSKIP"] = "PRF from a file: no BCD-level PRF"
        return out
    wcs = WCS(fitsio.wcs_cards(header), naxis=2)
    mosaic_pix = wcs_pixel_scale_arcsec(wcs)
    frame_pix = wcs_pixel_scale_arcsec(frames[0].wcs)
    fwhm = frames_psf_fwhm(float(out.meta.get("FWHM", 0.0)), band,
                           frame_pixel_arcsec=frame_pix, mosaic_pixel_arcsec=mosaic_pix)
    psf = SkyPsf.from_table_meta(out.meta, fwhm).on_frames(frame_pixel_arcsec=frame_pix,
                                                           fwhm_arcsec=fwhm)
    ra0, dec0, f0 = (np.asarray(out[c], float) for c in ("RA", "Dec", "flux"))
    fit = refine_on_frames(ra0, dec0, f0, frames, fwhm_arcsec=fwhm, fatal_bits=fatal_bits,
                           psf=psf)
    if not psf.is_gaussian:
        # The mosaic chose the diffraction pattern over the Gaussian from its few brightest
        # sources, on a profile that resampling has blurred; on the BCDs each model is exact:
        # there the Gaussian must fit worse, or it is the PSF (a pattern chosen wrongly
        # costs ~20% of every flux).
        gauss = refine_on_frames(ra0, dec0, f0, frames, fwhm_arcsec=fwhm,
                                 fatal_bits=fatal_bits, psf=SkyPsf(fwhm))
        if gauss.chi2_dof < fit.chi2_dof:
            _to_gaussian(out, f"{out.meta.get('PRFWHY', '')}; but on the BCDs the Gaussian "
                              f"fits better: chi^2/dof {gauss.chi2_dof:.3f} against "
                              f"{fit.chi2_dof:.3f} for the pattern")
            fit = gauss
    ok = fit.converged
    x, y = wcs.all_world2pix(fit.ra, fit.dec, 0)
    cols = {
        "RA": fit.ra, "Dec": fit.dec, "x": x, "y": y, "flux": fit.flux,
        "delta_RA": fit.delta_east_arcsec, "delta_Dec": fit.delta_north_arcsec,
        "delta_x": fit.delta_east_arcsec / mosaic_pix,
        "delta_y": fit.delta_north_arcsec / mosaic_pix, "delta_flux": fit.delta_flux,
    }
    for name, values in cols.items():
        if name in out.colnames:
            col = np.asarray(out[name], dtype=float)
            out[name][:] = np.where(ok, values, col)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["SNR"][:] = np.asarray(out["flux"], float) / np.asarray(out["delta_flux"], float)
    zero = band.vega_zero_jy if band is not None else None
    if zero is not None and "mag_vega" in out.colnames:
        mag, dmag = vega_magnitude(np.asarray(out["flux"], float),
                                   np.asarray(out["delta_flux"], float), vega_zero_jy=zero)
        out["mag_vega"][:] = mag
        out["delta_mag"][:] = dmag
    out.meta.update({"PRFMODE": "MULTIFRAME", "MFFWHM": round(fwhm, 4),
                     "MFCHI2": round(fit.chi2_dof, 4), "MFNCONV": int(ok.sum()),
                     "MFERRSC": "per source: sqrt of its stamps' reduced chi^2 (>= 1)"})
    return out


def _to_gaussian(table: Table, why: str) -> None:
    """`table` (an extraction that chose the diffraction pattern) switched to the Gaussian:
    PRFMODEL, PRFWHY and the aperture correction (its aperture sums do not depend on the
    model; flux_ap and delta_flux_ap are rescaled from the pattern's correction to the
    Gaussian's of the mosaic's FWHM)."""
    meta = table.meta
    old = float(meta.get("APCORR", 0.0))
    fwhm, r, pix = (float(meta.get(k, 0.0)) for k in ("FWHM", "APRAD", "PIXSCAL"))
    if old > 0 and fwhm > 0 and r > 0 and pix > 0:
        new = gaussian_aperture_correction(fwhm_arcsec=fwhm, radius_arcsec=r, pixel_arcsec=pix)
        for name in ("flux_ap", "delta_flux_ap"):
            if name in table.colnames:
                table[name][:] = np.asarray(table[name], float) * (new / old)
        meta.update({"APCORR": new, "APCSRC": "Gaussian PRF (chosen on the BCDs)"})
    for key in ("PRFLAMD", "PRFOBSC", "PRFBLUR", "PRFFWHM"):
        meta.pop(key, None)
    meta.update({"PRFMODEL": "Gaussian", "PRFWHY": why})
