"""PRF fitting: a point-response model fitted jointly to all sources.

The model is a pixel-integrated Gaussian (separable, evaluated exactly) or a `TabulatedPrf`
(an oversampled grid of the pixel-integrated PSF, e.g. a diffraction pattern with its rings,
interpolated with a cubic convolution kernel).

Every source has three free parameters (flux, x, y). Sources whose fitting stamps share pixels
form a group (a blend) whose parameters are solved together; the normal matrix is block diagonal
by group, so each Gauss-Newton (Levenberg-Marquardt damped) step is a batch of small dense
solves, one per group, batched by group size (isolated sources: one batched 3x3 solve). A blend
is never fitted one source at a time, and every group converges (and is damped) on its own.
Pixel coordinates are 0-based (numpy / astropy `origin=0`), the centre of pixel (i, j) being
(x=j, y=i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import erf

from services.extract import prf_kernels

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_COMPILED = True  # the PRF fits in `prf_kernels` (False: the array code, for comparison)


def sigma_from_fwhm(fwhm: float) -> float:
    """Gaussian sigma of a given FWHM (same unit)."""
    return fwhm / FWHM_PER_SIGMA


def pixel_integrated_gaussian_1d(
    offset_px: np.ndarray, sigma_px: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of a unit 1-D Gaussian falling in the pixel whose centre is `offset_px` from the
    Gaussian centre, and its derivative with respect to the Gaussian centre."""
    s = _SQRT2 * sigma_px
    hi = (offset_px + 0.5) / s
    lo = (offset_px - 0.5) / s
    value = 0.5 * (erf(hi) - erf(lo))
    deriv = (np.exp(-(lo * lo)) - np.exp(-(hi * hi))) / (_SQRT2PI * sigma_px)
    return value, deriv


def _keys_weights(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cubic convolution (Keys, a = -0.5) weights of the samples at -1, 0, 1, 2 for the
    fractional positions `t` in [0, 1), and their derivatives in t; shapes (..., 4)."""
    t2 = t * t
    t3 = t2 * t
    w = np.stack([(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2,
                  (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2], axis=-1)
    dw = np.stack([(-3 * t2 + 4 * t - 1) / 2, (9 * t2 - 10 * t) / 2,
                   (-9 * t2 + 8 * t + 1) / 2, (3 * t2 - 2 * t) / 2], axis=-1)
    return w, dw


class TabulatedPrf:
    """A point-response function tabulated on an oversampled grid.

    `grid[i, j]` is the fraction of a unit point source's total flux falling in a pixel whose
    centre lies at ((j - c) / oversample, (i - c) / oversample) pixels from the source, c the
    grid's central index (the PSF already integrated over the pixel, as SSC's PRF files and
    DAOPHOT's ePSF). The sum over any integer lattice of offsets is the flux fraction within
    the grid's extent. Between samples the PRF is interpolated with the cubic convolution kernel
    (continuous first derivatives, exact for quadratics); outside the grid it is 0.
    `name` and `params` say what the PRF is (for headers and logs).
    """

    def __init__(self, grid: np.ndarray, *, oversample: int, name: str,
                 params: dict[str, float] | None = None) -> None:
        g = np.asarray(grid, dtype=float)
        if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] % 2 == 0:
            raise ValueError(f"PRF grid must be square with an odd side, got {g.shape}")
        if oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.oversample = int(oversample)
        self.name = name
        self.params = dict(params or {})
        # Two zero samples on every side: the interpolation's taps past the edge read 0.
        self._grid = np.pad(g, 2)
        self._centre = (g.shape[0] - 1) // 2 + 2
        self.radius_px = ((g.shape[0] - 1) // 2) / self.oversample
        self.fwhm_px = self._fwhm()

    def _fwhm(self) -> float:
        """Full width at half maximum of the PRF's azimuthal mean (pixels)."""
        k = self.oversample
        c = self._centre
        # Radial bins of one sample, out to the first below half the central value: on a
        # central box that grows until it holds that bin whole (a box of half-size b holds
        # the bins below b whole, with the same sums as the whole grid), not the whole grid.
        box = 4 * k
        while True:
            lo = max(c - box, 0)
            g = self._grid[lo : c + box + 1, lo : c + box + 1]
            iy, ix = np.indices(g.shape)
            rbin = np.round(np.hypot(iy + lo - c, ix + lo - c)).astype(int).ravel()
            mean = np.bincount(rbin, g.ravel()) / np.maximum(np.bincount(rbin), 1)
            whole = lo == 0
            if not whole:
                mean = mean[:box]
            half = 0.5 * mean[0]
            below = np.flatnonzero(mean < half)
            if below.size or whole:
                break
            box *= 2
        if below.size == 0:
            return 2.0 * self.radius_px
        j = int(below[0])
        frac = (mean[j - 1] - half) / max(mean[j - 1] - mean[j], 1e-300)
        return 2.0 * (j - 1 + frac) / k

    def values(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """The PRF at pixel offsets (dx, dy) from the source (broadcast arrays)."""
        dx, dy = np.broadcast_arrays(np.asarray(dx, dtype=float), np.asarray(dy, dtype=float))
        k = self.oversample
        tx = self._centre + k * dx.ravel()
        ty = self._centre + k * dy.ravel()
        bx, by = np.floor(tx), np.floor(ty)
        wx, _ = _keys_weights(tx - bx)
        wy, _ = _keys_weights(ty - by)
        last = self._grid.shape[0] - 1
        taps = np.arange(-1, 3)
        cols = np.clip(bx.astype(np.int64)[:, None] + taps, 0, last)
        rows = np.clip(by.astype(np.int64)[:, None] + taps, 0, last)
        g = self._grid[rows[:, :, None], cols[:, None, :]]  # (m, 4, 4)
        return np.einsum("mlk,ml,mk->m", g, wy, wx).reshape(dx.shape)

    def stamps(
        self, first_dx: np.ndarray, first_dy: np.ndarray, size: int,
        mask_x: np.ndarray, mask_y: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The PRF on n square stamps of `size` pixels, and its derivatives with respect to the
        source position, each (n, size * size). The first stamp pixel lies at (first_dx,
        first_dy) (n,) from the source; `mask_x`, `mask_y` (n, size) zero the columns and rows
        outside the image. Within a stamp every pixel has the same sub-pixel phase, so the 4 x 4
        interpolation taps' weights are one set per source (`prf_kernels.tabulated_stamps`,
        compiled)."""
        return prf_kernels.tabulated_stamps(
            self._grid, self._centre, self.oversample,
            np.ascontiguousarray(first_dx, dtype=np.float64),
            np.ascontiguousarray(first_dy, dtype=np.float64), int(size),
            np.ascontiguousarray(mask_x, dtype=np.float64),
            np.ascontiguousarray(mask_y, dtype=np.float64))

    def add_squares(self, out: np.ndarray, *, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                    core_half: int) -> None:
        """Add flux x PRF to the image `out` (native float64, C-ordered) on each source's
        square of the PRF's radius (ceil(radius_px) pixels) around (round(x), round(y)),
        except on its central square of half-size `core_half` (compiled:
        `prf_kernels.add_wings`)."""
        def as_float(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a, dtype=np.float64)

        prf_kernels.add_wings(out, self._grid, self._centre, self.oversample,
                              math.ceil(self.radius_px), int(core_half),
                              np.round(x).astype(np.int64),
                              np.round(y).astype(np.int64), as_float(x), as_float(y),
                              as_float(flux))


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
    residual: np.ndarray  #: image minus the fitted model (full frame; (0, 0) if not asked)

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
    tol_sigma: float = 0.05,
    tol_chi2: float = 0.01,
    max_shift_px: float | None = None,
    free: np.ndarray | None = None,
    prf: TabulatedPrf | None = None,
    with_residual: bool = True,
) -> PrfFit:
    """Fit flux and position of every source jointly with a pixel-integrated Gaussian PRF of
    `fwhm_px` (or the tabulated `prf`, whose fwhm_px should then be passed as `fwhm_px`: it
    sets the default stamp and the position limits).

    `image` is background-subtracted (any surface-brightness unit), `weight` is 1/sigma^2 of each
    pixel (0 for pixels to ignore). Starting values `x0, y0` (0-based pixels) and `flux0` (image
    unit x pixel). Each source is fitted on the (2*half_size+1)^2 pixels around its start
    position (default half_size = ceil(1.5 FWHM)); the model at every fitted pixel is the sum of
    all sources, so blends are solved together. Positions may move at most `max_shift_px`
    (default 0.75 FWHM) from the start; sources that try to leave are pinned at the limit.
    A group of sources stops iterating when every source's position change is below `tol_px`
    or below `tol_sigma` times its position uncertainty, or when its chi^2 fell by less than
    `tol_chi2` (a faint source creeping by a small fraction of its error bar is statistically
    at rest); `converged` is False when some group was still moving after `max_iter`
    iterations.
    `free` (boolean, per source) iterates only the groups holding a free source; the other
    groups keep their start values (e.g. a refit after adding sources, where only the groups
    receiving one change) but are part of the model, the residual and the outputs.
    `with_residual=False` leaves `residual` empty (shape (0, 0)): a caller that only needs
    the fitted values skips a copy of the whole image.
    """
    image = np.asarray(image, dtype=float)
    weight = np.asarray(weight, dtype=float)
    x = np.asarray(x0, dtype=float).copy()
    y = np.asarray(y0, dtype=float).copy()
    flux = np.asarray(flux0, dtype=float).copy()
    n = x.size
    shape: float | TabulatedPrf = sigma_from_fwhm(fwhm_px) if prf is None else prf
    h = int(half_size if half_size is not None else max(2, math.ceil(1.5 * fwhm_px)))
    shift_max = 0.75 * fwhm_px if max_shift_px is None else max_shift_px
    if n == 0:
        empty = np.zeros(0)
        return PrfFit(empty, empty, empty, empty, empty, empty, empty, empty.astype(int),
                      empty.astype(int), empty.astype(int), True, image.copy())

    cx = np.round(x).astype(np.int64)
    cy = np.round(y).astype(np.int64)
    if _COMPILED:
        return _fit_compiled(
            image, weight, x=x, y=y, flux=flux, cx=cx, cy=cy, h=h, prf=shape,
            shift_max=shift_max, tol_px=tol_px, tol_sigma=tol_sigma, tol_chi2=tol_chi2,
            max_iter=max_iter, free=free, with_residual=with_residual)
    st = _Stamps(image, weight, cx, cy, h)
    xs0, ys0 = x.copy(), y.copy()
    lam = np.full(n, 1e-3)  # Levenberg-Marquardt damping, per source (equal within a group)
    todo = np.arange(n)  # sources of the groups still iterating
    if free is not None:
        todo = np.flatnonzero(np.isin(st.group, st.group[np.asarray(free, dtype=bool)]))
    sub = st
    iters = 0
    while todo.size and iters < max_iter:
        if todo.size < n:
            # Groups share no weighted pixel: the still-moving ones are a problem of their own.
            sub = st.subset(todo)
        moving, k = _iterate_groups(
            sub, x, y, flux, lam, todo, xs0=xs0, ys0=ys0, shape=shape, shift_max=shift_max,
            tol_px=tol_px, tol_sigma=tol_sigma, tol_chi2=tol_chi2, max_iter=max_iter - iters,
        )
        iters += k
        todo = todo[moving]
    prof, dpx, dpy = st.profiles(x, y, shape)
    total = st.total(flux, prof)

    # Covariance from the undamped normal matrix at the solution.
    hd, hp, _ = st.normal_equations(_jacobian(prof, dpx, dpy, flux), None)
    var = st.blocks().inverse_diagonal(hd, hp)

    resid_u = st.data_u - total
    chi2_st = np.sum(st.w_st * resid_u[st.row] ** 2, axis=1)
    npix = np.sum(st.w_st > 0, axis=1)
    if with_residual:
        residual = image.copy()
        residual.ravel()[st.uniq] = resid_u
    else:
        residual = np.empty((0, 0))
    counts = np.bincount(st.group)
    return PrfFit(
        flux=flux,
        x=x,
        y=y,
        flux_err=np.sqrt(var[:, 0]),
        x_err=np.sqrt(var[:, 1]),
        y_err=np.sqrt(var[:, 2]),
        chi2=chi2_st,
        npix=npix,
        group=st.group,
        n_in_group=counts[st.group],
        converged=todo.size == 0,
        residual=residual,
    )


def _stamp_groups(weight: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                  h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The groups of the stamps (half-size h, centred on the integer pixels cx, cy): stamps
    that share a weighted pixel are in one group (connected components). Returns each
    stamp's group, the groups' sizes, and the stamps ordered by group with each group's start
    in that order (n_groups + 1 entries), as the compiled kernels take them."""
    n = cx.size
    if n < 2:
        group = np.zeros(n, dtype=np.int64)
    else:
        cand = cKDTree(np.column_stack([cx, cy])).query_pairs(2 * h + 0.5, p=np.inf,
                                                              output_type="ndarray")
        ci, cj = cand[:, 0].astype(np.int64), cand[:, 1].astype(np.int64)
        share = prf_kernels.shared_weighted_pixel(weight, cx, cy, h, ci, cj)
        group = _connected_components(n, ci[share], cj[share])
    counts = np.bincount(group)
    order = np.argsort(group, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return group, counts, order, group_start


def _fit_compiled(
    image: np.ndarray, weight: np.ndarray, *, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
    cx: np.ndarray, cy: np.ndarray, h: int, prf: float | TabulatedPrf, shift_max: float,
    tol_px: float,
    tol_sigma: float, tol_chi2: float, max_iter: int, free: np.ndarray | None,
    with_residual: bool,
) -> PrfFit:
    """`fit_point_sources` in the compiled kernels (`prf_kernels`); `prf` is the Gaussian's
    sigma (pixels) or the tabulated PRF."""
    # C-ordered, writable, native float64: one compiled specialisation serves every call.
    image, weight = _kernel_array(image), _kernel_array(weight)
    if isinstance(prf, TabulatedPrf):
        sigma, grid, centre, oversample = 0.0, prf._grid, prf._centre, prf.oversample
    else:
        sigma, grid, centre, oversample = prf, np.zeros((0, 0)), 0, 1
    group, counts, order, group_start = _stamp_groups(weight, cx, cy, h)
    if free is None:
        iterate = np.ones(counts.size, dtype=bool)
    else:
        iterate = np.zeros(counts.size, dtype=bool)
        iterate[group[np.asarray(free, dtype=bool)]] = True
    residual = image.copy() if with_residual else np.empty((0, 0))
    var, moving, chi2, npix = prf_kernels.fit_groups(
        image, weight, cx, cy, h, sigma, grid, centre, oversample, x, y, flux, x.copy(),
        y.copy(), order, group_start, iterate, shift_max, tol_px, tol_sigma, tol_chi2, max_iter,
        residual)
    return PrfFit(
        flux=flux, x=x, y=y, flux_err=np.sqrt(var[:, 0]), x_err=np.sqrt(var[:, 1]),
        y_err=np.sqrt(var[:, 2]), chi2=chi2, npix=npix, group=group,
        n_in_group=counts[group], converged=not bool(np.any(moving)), residual=residual)


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """`a` as the compiled kernels take it: native float64, C-ordered, writable (numba
    compiles a separate specialisation for read-only arrays); copied only when needed."""
    return np.require(a, dtype=np.float64, requirements=["C", "W"])


def _iterate_groups(
    st: _Stamps,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    lam: np.ndarray,
    src: np.ndarray,
    *,
    xs0: np.ndarray,
    ys0: np.ndarray,
    shape: float | TabulatedPrf,
    shift_max: float,
    tol_px: float,
    tol_sigma: float,
    tol_chi2: float,
    max_iter: int,
) -> tuple[np.ndarray, int]:
    """Levenberg-Marquardt iterations of the sources `src` (whose stamps `st` describes), every
    group damped, accepted and stopped on its own; updates x, y, flux and lam in place.

    Returns after `max_iter` iterations, or when all groups have stopped, or when fewer than
    a quarter of the groups still move (the caller then continues on those alone, which is
    cheaper: re-cutting the geometry costs about as much as an iteration of all groups,
    measured on the bench mosaic). Returns the mask of `src` still moving and the number of
    iterations done.
    """
    ng = st.n_groups
    blocks = st.blocks()
    xs, ys, fs = x[src], y[src], flux[src]
    x0s, y0s = xs0[src], ys0[src]
    lam_g = np.zeros(ng)
    lam_g[st.group] = lam[src]
    prof, dpx, dpy = st.profiles(xs, ys, shape)
    total = st.total(fs, prof)
    chi2_g = st.group_chi2(total)
    active = np.ones(ng, dtype=bool)
    k = 0
    while k < max_iter:
        k += 1
        hd, hp, grad = st.normal_equations(_jacobian(prof, dpx, dpy, fs), st.data_u - total)
        diag = np.diagonal(hd, axis1=1, axis2=2)
        diag_safe = np.where(diag > 0, diag, 1.0)
        # Stop tolerance per source: tol_px or tol_sigma x its position error (conditional on
        # the other parameters: never larger than the marginal one, so the test is safe).
        tol_src = np.maximum(tol_px, tol_sigma * np.sqrt(1.0 / diag_safe[:, 1]
                                                         + 1.0 / diag_safe[:, 2]))
        pending = active.copy()
        moved = np.zeros(ng)
        gain = np.zeros(ng)  # chi^2 decrease of the accepted step
        for _try in range(6):
            # Only the pending groups' steps are used; the others' are solved and discarded.
            extra = lam_g[st.group, None] * diag_safe + (diag <= 0) * 1.0
            step = blocks.solve(hd, hp, extra, grad[:, :, None])[:, :, 0]
            xn, yn, fn = _trial(xs, ys, fs, step, pending[st.group], x0s, y0s, shift_max)
            pn, dxn, dyn = st.profiles(xn, yn, shape)
            cn = st.group_chi2(st.total(fn, pn))
            ok = pending & (cn <= chi2_g * (1 + 1e-12))
            if np.any(ok):
                acc = ok[st.group]
                np.maximum.at(moved, st.group[acc], (np.hypot(xn - xs, yn - ys) / tol_src)[acc])
                xs, ys, fs = np.where(acc, xn, xs), np.where(acc, yn, ys), np.where(acc, fn, fs)
                a2 = acc[:, None]
                prof = np.where(a2, pn, prof)
                dpx, dpy = np.where(a2, dxn, dpx), np.where(a2, dyn, dpy)
                total = st.total(fs, prof)
                gain = np.where(ok, chi2_g - cn, gain)
                chi2_g = np.where(ok, cn, chi2_g)
                lam_g = np.where(ok, np.maximum(lam_g / 10.0, 1e-7), lam_g)
                pending &= ~ok
            lam_g = np.where(pending, lam_g * 10.0, lam_g)
            if not np.any(pending):
                break
        # A group is done when no damping lowers its chi^2 or when it stopped moving.
        active &= ~(pending | (moved < 1.0) | (gain < tol_chi2))
        if 4 * np.count_nonzero(active) < ng:
            break
    x[src], y[src], flux[src], lam[src] = xs, ys, fs, lam_g[st.group]
    return active[st.group], k


def fit_common_fwhm(
    image: np.ndarray,
    weight: np.ndarray,
    *,
    x0: np.ndarray,
    y0: np.ndarray,
    flux0: np.ndarray,
    fwhm_px: float,
    half_size: int,
    fwhm_range: tuple[float, float] = (0.0, math.inf),
    max_iter: int = 30,
    tol: float = 1e-4,
    reject_factor: float | None = None,
) -> float:
    """FWHM (pixels) of the pixel-integrated Gaussian PRF that best fits all given sources.

    Flux and position of every source and one FWHM common to all are fitted together
    (Levenberg-Marquardt; the FWHM is eliminated from the block-diagonal source system by a
    Schur complement), i.e. the FWHM minimising the total chi^2, the sources refitted at each.
    `fwhm_px` is the start value, `fwhm_range` bounds the result; positions may move at most
    0.75 start FWHM. Stops when the relative FWHM change is below `tol`.
    With `reject_factor`, sources whose own preferred width (a step in sigma on their stamp
    alone) lies more than that factor times the steps' robust spread (and 2%) from the median
    (an unresolved blend, a saturated core: one such bright source dominates the total chi^2
    and widens the FWHM) are dropped and the fit is repeated once.
    """
    image = np.asarray(image, dtype=float)
    weight = np.asarray(weight, dtype=float)
    x = np.asarray(x0, dtype=float).copy()
    y = np.asarray(y0, dtype=float).copy()
    flux = np.asarray(flux0, dtype=float).copy()
    xs0, ys0 = x.copy(), y.copy()
    s_lo, s_hi = (sigma_from_fwhm(v) for v in fwhm_range)
    s = float(np.clip(sigma_from_fwhm(fwhm_px), s_lo, s_hi))
    shift_max = 0.75 * fwhm_px
    if _COMPILED:
        cx, cy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
        image_k, weight_k = _kernel_array(image), _kernel_array(weight)
        _, _, order, group_start = _stamp_groups(weight_k, cx, cy, int(half_size))
        s, step_s = prf_kernels.fit_common_sigma(
            image_k, weight_k, cx, cy, int(half_size),
            s, s_lo, s_hi, x, y, flux, order, group_start, shift_max, max_iter, tol)
        keep = _typical_width(step_s, s, reject_factor)
        if keep is not None:
            return fit_common_fwhm(
                image, weight, x0=x[keep], y0=y[keep], flux0=flux[keep],
                fwhm_px=s * FWHM_PER_SIGMA, half_size=half_size, fwhm_range=fwhm_range,
                max_iter=max_iter, tol=tol)
        return s * FWHM_PER_SIGMA
    st = _Stamps(image, weight, np.round(x).astype(np.int64), np.round(y).astype(np.int64),
                 int(half_size))
    blocks = st.blocks()
    every = np.ones(x.size, dtype=bool)

    def state(xs: np.ndarray, ys: np.ndarray, fs: np.ndarray, ss: float) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float
    ]:
        p, dx, dy, ds = st.profiles(xs, ys, ss, with_sigma=True)
        t = st.total(fs, p)
        r = st.data_u - t
        return p, dx, dy, ds, t, float(np.sum(st.w_u * r * r))

    prof, dpx, dpy, dps, total, chi2 = state(x, y, flux, s)
    lam = 1e-3
    for _ in range(max_iter):
        jac = _jacobian(prof, dpx, dpy, flux)
        resid = st.data_u - total
        hd, hp, grad = st.normal_equations(jac, resid)
        js_u = st.total(flux, dps)  # d model / d sigma at every pixel (all sources)
        wjs = st.w_st * js_u[st.row]
        couple = np.stack([np.einsum("ns,ns->n", c, wjs) for c in jac], axis=-1)
        d_ss = float(np.sum(st.w_u * js_u * js_u))
        g_s = float(np.sum(st.w_u * js_u * resid))
        diag = np.diagonal(hd, axis1=1, axis2=2)
        diag_safe = np.where(diag > 0, diag, 1.0)
        accepted = False
        ds = 0.0
        for _try in range(8):
            extra = lam * diag_safe + (diag <= 0) * 1.0
            sol = blocks.solve(hd, hp, extra, np.stack([grad, couple], axis=-1))
            schur = d_ss * (1.0 + lam) - float(np.sum(couple * sol[:, :, 1]))
            ds = (g_s - float(np.sum(couple * sol[:, :, 0]))) / max(schur, 1e-300)
            ds = float(np.clip(ds, -0.2 * s, 0.2 * s))
            step = sol[:, :, 0] - sol[:, :, 1] * ds
            sn = float(np.clip(s + ds, s_lo, s_hi))
            xn, yn, fn = _trial(x, y, flux, step, every, xs0, ys0, shift_max)
            trial = state(xn, yn, fn, sn)
            if trial[-1] <= chi2 * (1 + 1e-12):
                accepted = True
                ds = sn - s
                x, y, flux, s = xn, yn, fn, sn
                prof, dpx, dpy, dps, total, chi2 = trial
                lam = max(lam / 10.0, 1e-7)
                break
            lam *= 10.0
        if not accepted or abs(ds) < tol * s:
            break
    # Each source's preferred PSF width: one Gauss-Newton step in sigma alone on its own stamp.
    r = st.data_u - total
    jac_s = flux[:, None] * dps
    step_s = np.sum(st.w_st * r[st.row] * jac_s, axis=1) / np.maximum(
        np.sum(st.w_st * jac_s * jac_s, axis=1), 1e-300)
    keep = _typical_width(step_s, s, reject_factor)
    if keep is not None:
        # warm start from this fit: a few iterations move the FWHM off the blend's pull
        return fit_common_fwhm(
            image, weight, x0=x[keep], y0=y[keep], flux0=flux[keep],
            fwhm_px=s * FWHM_PER_SIGMA, half_size=half_size, fwhm_range=fwhm_range,
            max_iter=max_iter, tol=tol,
        )
    return s * FWHM_PER_SIGMA


def _typical_width(step_s: np.ndarray, sigma: float,
                   reject_factor: float | None) -> np.ndarray | None:
    """The sources to keep for a common-width fit, or None to keep them all: a blend (or a
    saturated core) wants a wider PSF than the rest (`step_s`: each source's preferred sigma
    step); the sources whose step is an outlier of the steps' robust spread (`reject_factor`
    times it, and 2% of sigma) are dropped, if at least 3 of 4 or more remain."""
    if reject_factor is None or step_s.size < 4:
        return None
    med = float(np.median(step_s))
    spread = 1.4826 * float(np.median(np.abs(step_s - med)))
    keep = np.abs(step_s - med) <= max(reject_factor * spread, 0.02 * sigma)
    return keep if 3 <= int(keep.sum()) < step_s.size else None


def _jacobian(prof: np.ndarray, dpx: np.ndarray, dpy: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """The model's derivatives in (flux, x, y) on every stamp pixel, (3, n, stamp pixels): the
    unit profile and the flux times its position derivatives, written in place."""
    j3 = np.empty((3, *prof.shape))
    j3[0] = prof
    np.multiply(flux[:, None], dpx, out=j3[1])
    np.multiply(flux[:, None], dpy, out=j3[2])
    return j3


def _trial(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    step: np.ndarray,
    use: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    shift_max: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trial parameters after a (flux, x, y) step for the sources flagged `use`."""
    dxy = step[:, 1:]
    # Trust region in position: a Gauss-Newton step far outside the PSF core is noise.
    big = np.max(np.abs(dxy), axis=1)
    scale = np.where(big > 0.5, 0.5 / np.maximum(big, 1e-12), 1.0)
    fn = flux + step[:, 0]
    xn = x0 + np.clip(x + dxy[:, 0] * scale - x0, -shift_max, shift_max)
    yn = y0 + np.clip(y + dxy[:, 1] * scale - y0, -shift_max, shift_max)
    return np.where(use, xn, x), np.where(use, yn, y), np.where(use, fn, flux)


class _Stamps:
    """Fixed fitting geometry: every source's stamp, the unique pixels they cover, and the
    pairs of sources whose stamps share weighted pixels (with the shared pixels)."""

    def __init__(
        self, image: np.ndarray, weight: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int
    ) -> None:
        """Stamps of half-size `h` centred on the integer pixels (cx, cy)."""
        ny, nx = image.shape
        n = cx.size
        off = np.arange(-h, h + 1)
        size = off.size
        self.px = cx[:, None] + off[None, :]  # (n, size)
        self.py = cy[:, None] + off[None, :]
        inx = (self.px >= 0) & (self.px < nx)
        iny = (self.py >= 0) & (self.py < ny)
        pxc = np.clip(self.px, 0, nx - 1)
        pyc = np.clip(self.py, 0, ny - 1)
        flat = (pyc[:, :, None] * nx + pxc[:, None, :]).reshape(n, -1)  # (n, size*size)
        inside = (iny[:, :, None] & inx[:, None, :]).reshape(n, -1)
        # The distinct pixels of all stamps, and each stamp pixel's index among them (a lookup
        # image instead of a sort, unless the stamps cover a small part of the image).
        if 16 * flat.size < ny * nx:
            self.uniq, row = np.unique(flat, return_inverse=True)
            self.row = row.reshape(n, -1)
        else:
            seen = np.zeros(ny * nx, dtype=bool)
            seen[flat] = True
            self.uniq = np.flatnonzero(seen)
            # int32: half the fresh memory of an int64 table, which costs more than the cast
            # (measured on the bench mosaic).
            small = np.int32 if ny * nx < 2**31 else np.int64
            lookup = np.empty(ny * nx, dtype=small)
            lookup[self.uniq] = np.arange(self.uniq.size, dtype=small)
            self.row = lookup[flat].astype(np.int64)
        self.row_flat = self.row.ravel()
        self.n_u = self.uniq.size
        self.data_u = image.ravel()[self.uniq]
        self.w_u = weight.ravel()[self.uniq]
        # Pixels outside the image were clipped onto the edge: no weight and no model there.
        # The mask is separable (rows x columns): applied to the 1-D profiles, it costs nothing
        # on the stamps.
        self.inx_f, self.iny_f = inx.astype(float), iny.astype(float)
        self._blocks: _Blocks | None = None
        self.w_st = np.where(inside, self.w_u[self.row], 0.0)

        # Pairs of stamps sharing a weighted pixel: stamps are equal squares on integer
        # centres, so stamp i's pixel (a, b) is stamp j's pixel (a - dcy, b - dcx).
        if n > 1:
            cand = cKDTree(np.column_stack([cx, cy])).query_pairs(
                2 * h + 0.5, p=np.inf, output_type="ndarray"
            )
        else:
            cand = np.zeros((0, 2), dtype=np.int64)
        ci, cj = cand[:, 0].astype(np.int64), cand[:, 1].astype(np.int64)
        s_idx = np.arange(size * size)
        aj = (s_idx // size)[None, :] - (cy[cj] - cy[ci])[:, None]
        bj = (s_idx % size)[None, :] - (cx[cj] - cx[ci])[:, None]
        shared = (aj >= 0) & (aj < size) & (bj >= 0) & (bj < size) & (self.w_st[ci] > 0)
        pk, sk = np.nonzero(shared)  # pair-major: entries of one pair are contiguous
        has = np.bincount(pk, minlength=ci.size) > 0
        new_id = np.cumsum(has) - 1
        self.pair_i, self.pair_j = ci[has], cj[has]
        self.e_pair = new_id[pk]
        self.e_si = sk
        self.e_sj = (aj * size + bj)[pk, sk]
        self.e_fi = self.pair_i[self.e_pair] * size * size + self.e_si
        self.e_fj = self.pair_j[self.e_pair] * size * size + self.e_sj
        self.e_start = _run_starts(self.e_pair) if pk.size else pk
        self.group = _connected_components(n, self.pair_i, self.pair_j)
        # Group owning each weighted pixel (unweighted pixels add nothing to any chi^2).
        self.pixel_group = np.zeros(self.n_u, dtype=np.int64)
        wpos = self.w_st > 0
        self.pixel_group[self.row[wpos]] = np.broadcast_to(self.group[:, None], wpos.shape)[wpos]
        self.n_groups = int(self.group.max()) + 1

    def subset(self, src: np.ndarray) -> _Stamps:
        """The stamps of the sources `src` (whole groups), on the pixels they cover (so that
        the model and chi^2 sums of a few still-moving groups cost little)."""
        out = object.__new__(_Stamps)
        pos = np.full(self.px.shape[0], -1, dtype=np.int64)
        pos[src] = np.arange(src.size)
        for name in ("px", "py", "inx_f", "iny_f", "w_st"):
            setattr(out, name, getattr(self, name)[src])
        # The subset's pixels, in the same (increasing) order: every per-pixel and per-group
        # sum adds the same terms in the same order as on the whole geometry.
        rows = self.row[src]
        used = np.zeros(self.n_u, dtype=bool)
        used[rows] = True
        keep_u = np.flatnonzero(used)
        lookup = np.empty(self.n_u, dtype=np.int64)
        lookup[keep_u] = np.arange(keep_u.size)
        out.row = lookup[rows]
        out.row_flat = out.row.ravel()
        out.uniq, out.n_u = self.uniq[keep_u], keep_u.size
        out.data_u, out.w_u = self.data_u[keep_u], self.w_u[keep_u]
        keep = pos[self.pair_i] >= 0  # groups are whole: both members of a pair, or neither
        out.pair_i, out.pair_j = pos[self.pair_i[keep]], pos[self.pair_j[keep]]
        new_id = np.cumsum(keep) - 1
        ek = keep[self.e_pair]
        out.e_pair = new_id[self.e_pair[ek]]
        s2 = self.px.shape[1] ** 2
        out.e_si, out.e_sj = self.e_si[ek], self.e_sj[ek]
        out.e_fi = out.pair_i[out.e_pair] * s2 + out.e_si
        out.e_fj = out.pair_j[out.e_pair] * s2 + out.e_sj
        out.e_start = _run_starts(out.e_pair) if out.e_pair.size else out.e_pair
        # The groups present, renumbered in increasing order (np.unique without its sort).
        present = np.zeros(self.n_groups, dtype=bool)
        present[self.group[src]] = True
        labels = np.flatnonzero(present)
        out.group = (np.cumsum(present) - 1)[self.group[src]]
        out.n_groups = labels.size
        out._blocks = None
        # Pixels of the other groups go to an extra group that no chi^2 reads.
        gmap = np.full(self.n_groups, out.n_groups, dtype=np.int64)
        gmap[labels] = np.arange(labels.size)
        out.pixel_group = gmap[self.pixel_group[keep_u]]
        return out

    def blocks(self) -> _Blocks:
        """The block structure of the normal matrix (built once per geometry)."""
        if self._blocks is None:
            self._blocks = _Blocks(self.group, self.pair_i, self.pair_j)
        return self._blocks

    def profiles(
        self, xs: np.ndarray, ys: np.ndarray, shape: float | TabulatedPrf, *,
        with_sigma: bool = False,
    ) -> tuple[np.ndarray, ...]:
        """Unit-flux PRF on every stamp pixel and its derivatives in x and y (and in sigma):
        `shape` is the Gaussian's sigma (pixels) or a tabulated PRF (no sigma derivative)."""
        n = xs.size
        size = self.px.shape[1]
        if isinstance(shape, TabulatedPrf):
            if with_sigma:
                raise ValueError("a tabulated PRF has no width parameter")
            return shape.stamps(self.px[:, 0] - xs, self.py[:, 0] - ys, size,
                                self.inx_f, self.iny_f)
        sigma = shape
        # x and y profiles in one evaluation; the in-image masks (0/1) on the 1-D factors.
        g, dg = _stamp_profile_1d(np.concatenate([self.px[:, 0] - xs, self.py[:, 0] - ys]),
                                  size, sigma)
        m = np.concatenate([self.inx_f, self.iny_f])
        g *= m
        dg *= m
        gx, gy, dgx, dgy = g[:n, None, :], g[n:, :, None], dg[:n, None, :], dg[n:, :, None]
        prof = (gy * gx).reshape(n, -1)
        dprof_dx = (gy * dgx).reshape(n, -1)
        dprof_dy = (dgy * gx).reshape(n, -1)
        if not with_sigma:
            return prof, dprof_dx, dprof_dy
        sx = _gaussian_1d_dsigma(self.px - xs[:, None], sigma) * self.inx_f
        sy = _gaussian_1d_dsigma(self.py - ys[:, None], sigma) * self.iny_f
        dprof_ds = sy[:, :, None] * gx + gy * sx[:, None, :]
        return prof, dprof_dx, dprof_dy, dprof_ds.reshape(n, -1)

    def total(self, flux: np.ndarray, prof: np.ndarray) -> np.ndarray:
        """Sum over sources of flux x profile at every unique pixel."""
        return np.bincount(self.row_flat, weights=(flux[:, None] * prof).ravel(),
                           minlength=self.n_u)

    def group_chi2(self, total: np.ndarray) -> np.ndarray:
        """Weighted squared residual summed over each group's pixels."""
        r = self.data_u - total
        chi2 = np.bincount(self.pixel_group, weights=self.w_u * r * r,
                           minlength=self.n_groups + 1)
        return chi2[: self.n_groups]

    def normal_equations(
        self, j3: np.ndarray, resid_u: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """J^T W J as per-source 3x3 blocks (n, 3, 3) and per-pair blocks (pairs, 3, 3), and
        the gradient J^T W r (n, 3) (zeros when `resid_u` is None). `j3` holds the model's
        derivatives in flux, x and y on every stamp pixel, (3, n, stamp pixels) (`_jacobian`)."""
        n = j3.shape[1]
        jw = j3 * self.w_st
        hd = np.empty((n, 3, 3))
        for a in range(3):
            for b in range(a, 3):
                hd[:, a, b] = hd[:, b, a] = np.einsum("ns,ns->n", jw[a], j3[b])
        if self.e_pair.size:
            # Every (a, b) product of the shared pixels' derivatives at once, (entries, 9).
            ja = jw.reshape(3, -1)[:, self.e_fi]
            jb = j3.reshape(3, -1)[:, self.e_fj]
            prods = (ja.T[:, :, None] * jb.T[:, None, :]).reshape(-1, 9)
            hp = np.add.reduceat(prods, self.e_start, axis=0).reshape(-1, 3, 3)
        else:
            hp = np.zeros((0, 3, 3))
        if resid_u is None:
            return hd, hp, np.zeros((n, 3))
        return hd, hp, np.einsum("ans,ns->na", jw, resid_u[self.row])


class _Blocks:
    """The block-diagonal normal matrix, one dense block per group of sources, solved and
    inverted batched by group size.

    Every block of every size class lives in one flat buffer, filled by a single gather /
    scatter (index arrays computed once here): the per-iteration cost is one LAPACK call per
    size class, not a dozen small array operations per class."""

    def __init__(self, group: np.ndarray, pair_i: np.ndarray, pair_j: np.ndarray) -> None:
        n = group.size
        sizes = np.bincount(group)
        # Groups ordered by (size, id): a size class is a run of groups, `slot` a group's index
        # within its class; sources ordered by (group size, group, index) (`perm`), `loc` a
        # source's index within its group.
        g_order = np.lexsort((np.arange(sizes.size), sizes))
        g_sorted = sizes[g_order]
        # The size classes: runs of equal sizes in the sorted sizes (np.unique without a sort).
        cls_first = _run_starts(g_sorted)
        cls_sizes = g_sorted[cls_first]
        cls_count = np.diff(np.append(cls_first, g_sorted.size))
        slot = np.empty(sizes.size, dtype=np.int64)
        slot[g_order] = np.arange(sizes.size) - np.repeat(cls_first, cls_count)
        d_cls = 3 * cls_sizes
        base_cls = np.concatenate([[0], np.cumsum(cls_count * d_cls * d_cls)])
        cls_of_g = np.empty(sizes.size, dtype=np.int64)
        cls_of_g[g_order] = np.repeat(np.arange(cls_sizes.size), cls_count)
        self._perm = np.lexsort((np.arange(n), group, sizes[group]))
        first = np.concatenate([[0], np.cumsum(sizes)])  # sources of group k: first[k]...
        loc = np.empty(n, dtype=np.int64)
        by_group = np.lexsort((np.arange(n), group))
        loc[by_group] = np.arange(n) - first[group[by_group]]
        src_first = np.concatenate([[0], np.cumsum(cls_count * cls_sizes)])
        self.classes = [
            (int(g), int(ng), int(s0), int(b0))
            for g, ng, s0, b0 in zip(cls_sizes, cls_count, src_first[:-1], base_cls[:-1],
                                     strict=True)
        ]
        self._size = int(base_cls[-1])
        k3 = np.arange(3)
        k9 = np.arange(9)

        def block_origin(src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Flat position of each source's group block, and that block's side."""
            c = cls_of_g[group[src]]
            d = d_cls[c]
            return base_cls[c] + slot[group[src]] * d * d, d

        o_src, d_src = block_origin(np.arange(n))
        r_src = 3 * loc[:, None] + k3[None, :]  # (n, 3) parameter rows within the block
        o_pair, d_pair = block_origin(pair_i)
        r_i = 3 * loc[pair_i][:, None] + k3[None, :]
        r_j = 3 * loc[pair_j][:, None] + k3[None, :]
        # Flat buffer position <- position in [hd, hp] (ravelled), computed once.
        hp_at = (9 * n + np.arange(pair_i.size)[:, None] * 9 + k9[None, :]).ravel()
        self._dest = np.concatenate([
            (o_src[:, None, None] + r_src[:, :, None] * d_src[:, None, None]
             + r_src[:, None, :]).ravel(),
            (o_pair[:, None, None] + r_i[:, :, None] * d_pair[:, None, None]
             + r_j[:, None, :]).ravel(),
            (o_pair[:, None, None] + r_j[:, None, :] * d_pair[:, None, None]
             + r_i[:, :, None]).ravel(),
        ])
        self._take = np.concatenate([np.arange(9 * n), hp_at, hp_at])
        self._diag_dest = (o_src[:, None] + r_src * (d_src[:, None] + 1)).ravel()
        self._n = n

    def _buffer(self, hd: np.ndarray, hp: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        """Every block, flat: H (and + diag(extra)) in class order."""
        m = np.zeros(self._size)
        m[self._dest] = np.concatenate([hd.ravel(), hp.ravel()])[self._take]
        if extra is not None:
            m[self._diag_dest] += extra.ravel()
        return m

    def solve(self, hd: np.ndarray, hp: np.ndarray, extra: np.ndarray,
              rhs: np.ndarray) -> np.ndarray:
        """Solve (H + diag(extra)) s = rhs, rhs of shape (n, 3, k); returns (n, 3, k)."""
        k = rhs.shape[2]
        m = self._buffer(hd, hp, extra)
        b_all = rhs[self._perm]
        sol_all = np.empty_like(b_all)
        for g, ng, s0, base in self.classes:
            d = 3 * g
            mat = m[base : base + ng * d * d].reshape(ng, d, d)
            b = b_all[s0 : s0 + ng * g].reshape(ng, d, k)
            try:
                sol = np.linalg.solve(mat, b)
            except np.linalg.LinAlgError:
                sol = np.linalg.pinv(mat) @ b
            sol_all[s0 : s0 + ng * g] = sol.reshape(ng * g, 3, k)
        out = np.empty_like(rhs)
        out[self._perm] = sol_all
        return out

    def inverse_diagonal(self, hd: np.ndarray, hp: np.ndarray) -> np.ndarray:
        """Diagonal of the inverse normal matrix, (n, 3); inf for sources without data."""
        m_all = self._buffer(hd, hp, None)
        diag_all = np.empty((self._n, 3))
        for g, ng, s0, base in self.classes:
            d = 3 * g
            m = m_all[base : base + ng * d * d].reshape(ng, d, d)
            ok = np.all(np.diagonal(m, axis1=1, axis2=2) > 0, axis=1)
            inv = np.full_like(m, np.inf)
            if np.any(ok):
                try:
                    inv[ok] = np.linalg.inv(m[ok])
                except np.linalg.LinAlgError:
                    inv[ok] = np.linalg.pinv(m[ok])
            diag_all[s0 : s0 + ng * g] = np.diagonal(inv, axis1=1, axis2=2).reshape(ng * g, 3)
        out = np.empty((self._n, 3))
        out[self._perm] = diag_all
        return np.where(np.isfinite(out), np.maximum(out, 0.0), np.inf)


def _connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label of each of n nodes joined by the edges (i, j), numbered in order of
    their lowest node (as scipy's connected_components). Minimum-label propagation with
    pointer jumping: blends are small, so a few vectorised passes replace scipy's graph
    set-up, which costs ~1 ms per call here."""
    lab = np.arange(n)
    while i.size:
        low = np.minimum(lab[i], lab[j])
        new = lab.copy()
        np.minimum.at(new, i, low)
        np.minimum.at(new, j, low)
        new = new[new]
        if np.array_equal(new, lab):
            break
        lab = new
    # Each label is its component's lowest node (which is its own label): components are
    # numbered in order of their lowest node (np.unique(lab, return_inverse=True) without a sort).
    roots = lab == np.arange(n)
    return (np.cumsum(roots) - 1)[lab].astype(np.int64)


def _run_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts in the (non-empty) 1-D array `keys`."""
    return np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])


def _stamp_profile_1d(
    first_offset: np.ndarray, size: int, sigma_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """`pixel_integrated_gaussian_1d` on `size` consecutive pixels whose first is at
    `first_offset` (n,) from the centre: each pixel edge is shared by two pixels, so erf and
    exp are evaluated once per edge (size + 1) instead of twice per pixel."""
    t = (first_offset[:, None] + (np.arange(size + 1) - 0.5)[None, :]) / (_SQRT2 * sigma_px)
    e = erf(t)
    g = np.exp(-(t * t))
    return 0.5 * (e[:, 1:] - e[:, :-1]), (g[:, :-1] - g[:, 1:]) / (_SQRT2PI * sigma_px)


def _gaussian_1d_dsigma(offset_px: np.ndarray, sigma_px: float) -> np.ndarray:
    """Derivative of `pixel_integrated_gaussian_1d`'s value with respect to sigma."""
    s = _SQRT2 * sigma_px
    hi = (offset_px + 0.5) / s
    lo = (offset_px - 0.5) / s
    return (lo * np.exp(-(lo * lo)) - hi * np.exp(-(hi * hi))) / (math.sqrt(math.pi) * sigma_px)
