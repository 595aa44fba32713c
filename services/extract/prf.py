"""PRF fitting: pixel-integrated Gaussian point-response model, fitted jointly to all sources.

Every source has three free parameters (flux, x, y). All sources are solved in one sparse
Gauss-Newton (Levenberg-Marquardt damped) system, so sources whose fitting stamps overlap are
fitted simultaneously (a blend is never fitted one source at a time), while isolated sources cost
no more than a 3x3 block each. Pixel coordinates are 0-based (numpy / astropy `origin=0`), the
centre of pixel (i, j) being (x=j, y=i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.special import erf

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def sigma_from_fwhm(fwhm: float) -> float:
    """Gaussian sigma of a given FWHM (same unit)."""
    return fwhm / FWHM_PER_SIGMA


def pixel_integrated_gaussian_1d(
    offset_px: np.ndarray, sigma_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of a unit 1-D Gaussian falling in the pixel whose centre is `offset_px` from the
    Gaussian centre, and its derivative with respect to the Gaussian centre."""
    s = _SQRT2 * sigma_px
    hi = (offset_px + 0.5) / s
    lo = (offset_px - 0.5) / s
    value = 0.5 * (erf(hi) - erf(lo))
    deriv = (np.exp(-(lo * lo)) - np.exp(-(hi * hi))) / (_SQRT2PI * sigma_px)
    return value, deriv


def psf_stamp(x0: float, y0: float, *, sigma_px: float, half_size: int) -> np.ndarray:
    """Pixel-integrated unit-flux Gaussian on the (2*half_size+1)^2 pixels around round(x0,y0)."""
    off = np.arange(-half_size, half_size + 1, dtype=float)
    gx, _ = pixel_integrated_gaussian_1d(np.round(x0) + off - x0, sigma_px)
    gy, _ = pixel_integrated_gaussian_1d(np.round(y0) + off - y0, sigma_px)
    return gy[:, None] * gx[None, :]


@dataclass(frozen=True, slots=True)
class PrfFit:
    """Result of `fit_point_sources` (arrays of length n_sources unless stated).

    Flux is in the image unit times pixel (e.g. MJy/sr x pixel: multiply by the pixel solid angle
    to get a flux density); positions in 0-based pixels.
    """

    flux: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux_err: np.ndarray
    x_err: np.ndarray
    y_err: np.ndarray
    chi2: np.ndarray  #: weighted squared residual summed over each source's stamp
    npix: np.ndarray  #: pixels with non-zero weight in each source's stamp
    group: np.ndarray  #: id of the set of sources whose stamps overlap (fitted jointly)
    n_in_group: np.ndarray  #: N_PS: number of point sources fitted jointly with this one
    converged: bool
    residual: np.ndarray  #: image minus the fitted model (full frame)

    @property
    def chi2_dof(self) -> np.ndarray:
        dof = np.maximum(self.npix - 3, 1)
        return self.chi2 / dof


def fit_point_sources(
    image: np.ndarray,
    weight: np.ndarray,
    *,
    x0: np.ndarray,
    y0: np.ndarray,
    flux0: np.ndarray,
    fwhm_px: float,
    half_size: int | None = None,
    max_iter: int = 20,
    tol_px: float = 1e-3,
    max_shift_px: float | None = None,
) -> PrfFit:
    """Fit flux and position of every source jointly with a pixel-integrated Gaussian PRF.

    `image` is background-subtracted (any surface-brightness unit), `weight` is 1/sigma^2 of each
    pixel (0 for pixels to ignore). Starting values `x0, y0` (0-based pixels) and `flux0` (image
    unit x pixel). Each source is fitted on the (2*half_size+1)^2 pixels around its start
    position (default half_size = ceil(1.5 FWHM)); the model at every fitted pixel is the sum of
    all sources, so blends are solved together. Positions may move at most `max_shift_px`
    (default 0.75 FWHM) from the start; sources that try to leave are pinned at the limit.
    """
    image = np.asarray(image, dtype=float)
    weight = np.asarray(weight, dtype=float)
    ny, nx = image.shape
    x = np.asarray(x0, dtype=float).copy()
    y = np.asarray(y0, dtype=float).copy()
    flux = np.asarray(flux0, dtype=float).copy()
    n = x.size
    sigma = sigma_from_fwhm(fwhm_px)
    h = int(half_size if half_size is not None else max(2, math.ceil(1.5 * fwhm_px)))
    shift_max = 0.75 * fwhm_px if max_shift_px is None else max_shift_px
    if n == 0:
        empty = np.zeros(0)
        return PrfFit(empty, empty, empty, empty, empty, empty, empty, empty.astype(int),
                      empty.astype(int), empty.astype(int), True, image.copy())

    # Stamp geometry is fixed for the whole fit: the sparsity pattern never changes.
    off = np.arange(-h, h + 1)
    size = off.size
    cx = np.round(x).astype(np.int64)
    cy = np.round(y).astype(np.int64)
    px = cx[:, None] + off[None, :]  # (n, size)
    py = cy[:, None] + off[None, :]
    inx = (px >= 0) & (px < nx)
    iny = (py >= 0) & (py < ny)
    pxc = np.clip(px, 0, nx - 1)
    pyc = np.clip(py, 0, ny - 1)
    flat = (pyc[:, :, None] * nx + pxc[:, None, :]).reshape(n, -1)  # (n, size*size)
    inside = (iny[:, :, None] & inx[:, None, :]).reshape(n, -1)
    uniq, row = np.unique(flat, return_inverse=True)
    row = row.reshape(n, -1)
    data_u = image.ravel()[uniq]
    w_u = weight.ravel()[uniq]
    # Pixels outside the image were clipped onto the edge: give them no weight in their stamp.
    w_st = np.where(inside, w_u[row], 0.0)
    npix_u = uniq.size
    cols = np.arange(3 * n).reshape(n, 3)
    j_rows = np.repeat(row.ravel(), 3)
    j_cols = np.broadcast_to(cols[:, None, :], (n, size * size, 3)).ravel()
    # The total model at a pixel must only count pixels that are genuinely inside stamps.
    inside_f = inside.astype(float)

    def model_terms(
        xs: np.ndarray, ys: np.ndarray, fs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        gx, dgx = pixel_integrated_gaussian_1d(px - xs[:, None], sigma)
        gy, dgy = pixel_integrated_gaussian_1d(py - ys[:, None], sigma)
        prof = (gy[:, :, None] * gx[:, None, :]).reshape(n, -1)
        dprof_dx = (gy[:, :, None] * dgx[:, None, :]).reshape(n, -1)
        dprof_dy = (dgy[:, :, None] * gx[:, None, :]).reshape(n, -1)
        m = fs[:, None] * prof * inside_f
        total = np.bincount(row.ravel(), weights=m.ravel(), minlength=npix_u)
        return prof * inside_f, dprof_dx * inside_f, dprof_dy * inside_f, total

    def chi2_of(total: np.ndarray) -> float:
        r = data_u - total
        return float(np.sum(w_u * r * r))

    lam = 1e-3
    converged = False
    prof, dpx, dpy, total = model_terms(x, y, flux)
    chi2_now = chi2_of(total)
    for _ in range(max_iter):
        jac = np.stack([prof, flux[:, None] * dpx, flux[:, None] * dpy], axis=-1)
        jmat = sp.csr_matrix((jac.ravel(), (j_rows, j_cols)), shape=(npix_u, 3 * n))
        wj = sp.diags(w_u) @ jmat
        hess = (jmat.T @ wj).tocsc()
        grad = wj.T @ (data_u - total)
        diag = hess.diagonal()
        diag_safe = np.where(diag > 0, diag, 1.0)
        accepted = False
        for _try in range(6):
            damped = hess + sp.diags(lam * diag_safe + (diag <= 0) * 1.0)
            step = spla.spsolve(damped.tocsc(), grad)
            step = step.reshape(n, 3)
            dxy = step[:, 1:]
            # Trust region in position: a Gauss-Newton step far outside the PSF core is noise.
            big = np.max(np.abs(dxy), axis=1)
            scale = np.where(big > 0.5, 0.5 / np.maximum(big, 1e-12), 1.0)
            fn = flux + step[:, 0]
            xn = x + dxy[:, 0] * scale
            yn = y + dxy[:, 1] * scale
            xn = x0 + np.clip(xn - x0, -shift_max, shift_max)
            yn = y0 + np.clip(yn - y0, -shift_max, shift_max)
            pn, dxn, dyn, tn = model_terms(xn, yn, fn)
            c = chi2_of(tn)
            if c <= chi2_now * (1 + 1e-12):
                accepted = True
                moved = float(np.max(np.hypot(xn - x, yn - y)))
                x, y, flux = xn, yn, fn
                prof, dpx, dpy, total, chi2_now = pn, dxn, dyn, tn, c
                lam = max(lam / 10.0, 1e-7)
                break
            lam *= 10.0
        if not accepted or moved < tol_px:
            converged = True
            break

    # Covariance from the undamped normal matrix at the solution.
    jac = np.stack([prof, flux[:, None] * dpx, flux[:, None] * dpy], axis=-1)
    jmat = sp.csr_matrix((jac.ravel(), (j_rows, j_cols)), shape=(npix_u, 3 * n))
    hess = (jmat.T @ (sp.diags(w_u) @ jmat)).tocsc()
    group = _coupling_groups(hess, n)
    var = _block_inverse_diagonal(hess, group)

    resid_u = data_u - total
    chi2_st = np.sum(w_st * resid_u[row] ** 2, axis=1)
    npix = np.sum(w_st > 0, axis=1)
    residual = image.copy()
    residual.ravel()[uniq] = resid_u
    counts = np.bincount(group)
    return PrfFit(
        flux=flux,
        x=x,
        y=y,
        flux_err=np.sqrt(var[:, 0]),
        x_err=np.sqrt(var[:, 1]),
        y_err=np.sqrt(var[:, 2]),
        chi2=chi2_st,
        npix=npix,
        group=group,
        n_in_group=counts[group],
        converged=converged,
        residual=residual,
    )


def _coupling_groups(hess: sp.csc_matrix, n: int) -> np.ndarray:
    """Sources coupled in the normal matrix (they share fitted pixels): the fit's blends."""
    from scipy.sparse.csgraph import connected_components

    coo = hess.tocoo()
    src = sp.coo_matrix(
        (np.ones(coo.nnz), (coo.row // 3, coo.col // 3)), shape=(n, n)
    ).tocsr()
    _, labels = connected_components(src, directed=False)
    return labels.astype(np.int64)


def _block_inverse_diagonal(hess: sp.csc_matrix, group: np.ndarray) -> np.ndarray:
    """Diagonal of the inverse of the block-structured normal matrix, shape (n, 3).

    The matrix is block diagonal by coupling group, so every group is inverted on its own:
    isolated sources as one batched 3x3 inverse, blends batched by group size.
    """
    n = group.size
    csr = hess.tocsr()
    out = np.full((n, 3), np.inf)
    sizes = np.bincount(group)
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for g in np.unique(sizes):
        gids = np.flatnonzero(sizes == g)
        # members[k] = the g sources of the k-th group of this size
        members = order[starts[gids][:, None] + np.arange(g)[None, :]]
        params = (3 * members[:, :, None] + np.arange(3)[None, None, :]).reshape(len(gids), -1)
        rr = np.repeat(params, 3 * g, axis=1).ravel()
        cc = np.tile(params, (1, 3 * g)).ravel()
        blocks = np.asarray(csr[rr, cc]).reshape(len(gids), 3 * g, 3 * g)
        ok = np.all(np.diagonal(blocks, axis1=1, axis2=2) > 0, axis=1)
        inv = np.full_like(blocks, np.inf)
        if np.any(ok):
            inv[ok] = np.linalg.inv(blocks[ok])
        d = np.diagonal(inv, axis1=1, axis2=2).reshape(len(gids), g, 3)
        out[members.ravel()] = d.reshape(-1, 3)
    return np.where(np.isfinite(out), np.maximum(out, 0.0), np.inf)
