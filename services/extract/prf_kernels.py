"""Compiled kernels of the PRF fits (numba, nopython, GIL released).

`prf.fit_point_sources` (with the pixel-integrated Gaussian or a tabulated PRF) and
`prf.fit_common_fwhm` (Gaussian) run here, as do the tabulated PRF's stamps
(`tabulated_stamps`: the cubic-convolution interpolation) and the far wings the extraction
subtracts (`add_wings`). The algorithm is the same as the vectorised numpy code of `prf.py`,
kept as the tests' reference: sources whose stamps share a weighted pixel form a group, each
group is fitted on its own by Levenberg-Marquardt (flux, x, y per source; damping, step
acceptance, trust region and stopping rules as in `prf._iterate_groups`), and the covariance is
the inverse of the undamped normal matrix at the solution. Here a group is one pass of compiled
loops over its stamps' pixels instead of batched array operations over all groups: a group's
normal matrix, model and chi^2 are accumulated in place, without the stamp-sized temporaries the
array code needs (measured on the bench mosaic: the fits were ~60 % of the extraction's time).

A group is worked on in its bounding box: `wl` holds the weights of the pixels of its stamps (0
elsewhere, so a neighbouring group's pixels never count), `model` the sum of its sources. The
separable Gaussian is evaluated once per stamp row and column (erf at the pixel edges); a
tabulated PRF once per stamp pixel (`_group_prf`).

The JIT compilation (~40 s on the 2-core bench machine) is cached on disk: the first call in
a fresh checkout compiles, later processes load the machine code (~0.4 s). Set
NUMBA_CACHE_DIR where the package directory is read-only; `jit.compile_kernels` compiles (or
loads) them ahead of the first extraction.
"""

from __future__ import annotations

import math

import numpy as np

from services.extract.jit import kernel

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_SQRTPI = math.sqrt(math.pi)
#: Systems up to this size (10 sources) are solved by the Cholesky loop here, larger by LAPACK
#: (measured: a 400-source blend took 21 s with the loop, 2 s with LAPACK).
_SMALL_SYSTEM = 30


@kernel
def _profile_1d(first_offset: float, size: int, sigma: float, g: np.ndarray, dg: np.ndarray,
                ds: np.ndarray, with_sigma: bool) -> None:
    """Pixel-integrated unit Gaussian on `size` consecutive pixels, the first at
    `first_offset` from the centre (g), its derivative with respect to the centre (dg) and,
    `with_sigma`, to sigma (ds); erf and exp once per pixel edge."""
    s = _SQRT2 * sigma
    t0 = (first_offset - 0.5) / s
    e0 = math.erf(t0)
    q0 = math.exp(-t0 * t0)
    for i in range(size):
        t1 = (first_offset + i + 0.5) / s
        e1 = math.erf(t1)
        q1 = math.exp(-t1 * t1)
        g[i] = 0.5 * (e1 - e0)
        dg[i] = (q0 - q1) / (_SQRT2PI * sigma)
        if with_sigma:
            ds[i] = (t0 * q0 - t1 * q1) / (_SQRTPI * sigma)
        t0, e0, q0 = t1, e1, q1


@kernel
def _profiles(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, sigma: float,
              xs: np.ndarray, ys: np.ndarray, with_sigma: bool) -> tuple[
                  np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row and column factors of the group's stamps: (k, 2h+1) each for g, dg (and ds)."""
    k = mem.size
    size = 2 * h + 1
    gx = np.empty((k, size))
    gy = np.empty((k, size))
    dgx = np.empty((k, size))
    dgy = np.empty((k, size))
    sx = np.empty((k, size) if with_sigma else (0, 0))
    sy = np.empty((k, size) if with_sigma else (0, 0))
    for a in range(k):
        s = mem[a]
        _profile_1d(cx[s] - h - xs[a], size, sigma, gx[a], dgx[a],
                    sx[a] if with_sigma else gx[a], with_sigma)
        _profile_1d(cy[s] - h - ys[a], size, sigma, gy[a], dgy[a],
                    sy[a] if with_sigma else gy[a], with_sigma)
    return gx, gy, dgx, dgy, sx, sy


@kernel
def _span(c: int, h: int, lo: int, hi: int) -> tuple[int, int]:
    """Image rows (or columns) of a stamp centred on c, clipped to [lo, hi]."""
    return max(c - h, lo), min(c + h, hi)


@kernel
def _add_separable(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, flux: np.ndarray,
                   gy: np.ndarray, gx: np.ndarray, bx0: int, by0: int, out: np.ndarray) -> None:
    """Add flux x gy (rows) x gx (columns) of each source's stamp to the bounding box `out`."""
    nyb, nxb = out.shape
    for a in range(mem.size):
        s = mem[a]
        r0, r1 = _span(cy[s], h, by0, by0 + nyb - 1)
        c0, c1 = _span(cx[s], h, bx0, bx0 + nxb - 1)
        f = flux[a]
        for r in range(r0, r1 + 1):
            fy = f * gy[a, r - cy[s] + h]
            for c in range(c0, c1 + 1):
                out[r - by0, c - bx0] += fy * gx[a, c - cx[s] + h]


@kernel
def _model(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, flux: np.ndarray,
           gx: np.ndarray, gy: np.ndarray, bx0: int, by0: int, out: np.ndarray) -> None:
    """Sum of the group's sources on its bounding box (out, zeroed here)."""
    out[:, :] = 0.0
    _add_separable(mem, cx, cy, h, flux, gy, gx, bx0, by0, out)


@kernel
def _chi2(wl: np.ndarray, dl: np.ndarray, model: np.ndarray) -> float:
    total = 0.0
    nyb, nxb = wl.shape
    for r in range(nyb):
        for c in range(nxb):
            w = wl[r, c]
            if w > 0.0:
                d = dl[r, c] - model[r, c]
                total += w * d * d
    return total


@kernel
def _normal_equations(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int,
                      flux: np.ndarray, gx: np.ndarray, gy: np.ndarray, dgx: np.ndarray,
                      dgy: np.ndarray, wl: np.ndarray, dl: np.ndarray, model: np.ndarray,
                      bx0: int, by0: int) -> tuple[np.ndarray, np.ndarray]:
    """J^T W J (3k, 3k) and J^T W r (3k) of the group; parameters (flux, x, y) per source."""
    k = mem.size
    nyb, nxb = wl.shape
    hm = np.zeros((3 * k, 3 * k))
    grad = np.zeros(3 * k)
    for a in range(k):
        sa = mem[a]
        fa = flux[a]
        for b in range(a, k):
            sb = mem[b]
            if abs(cx[sa] - cx[sb]) > 2 * h or abs(cy[sa] - cy[sb]) > 2 * h:
                continue
            fb = flux[b]
            r0 = max(max(cy[sa], cy[sb]) - h, by0)
            r1 = min(min(cy[sa], cy[sb]) + h, by0 + nyb - 1)
            c0 = max(max(cx[sa], cx[sb]) - h, bx0)
            c1 = min(min(cx[sa], cx[sb]) + h, bx0 + nxb - 1)
            h00 = h01 = h02 = h10 = h11 = h12 = h20 = h21 = h22 = 0.0
            g0 = g1 = g2 = 0.0
            for r in range(r0, r1 + 1):
                ia = r - cy[sa] + h
                ib = r - cy[sb] + h
                gya, dgya = gy[a, ia], dgy[a, ia]
                gyb, dgyb = gy[b, ib], dgy[b, ib]
                for c in range(c0, c1 + 1):
                    w = wl[r - by0, c - bx0]
                    if w == 0.0:
                        continue
                    ja = c - cx[sa] + h
                    jb = c - cx[sb] + h
                    a0 = gya * gx[a, ja]
                    a1 = fa * gya * dgx[a, ja]
                    a2 = fa * dgya * gx[a, ja]
                    b0 = w * gyb * gx[b, jb]
                    b1 = w * fb * gyb * dgx[b, jb]
                    b2 = w * fb * dgyb * gx[b, jb]
                    h00 += a0 * b0
                    h01 += a0 * b1
                    h02 += a0 * b2
                    h10 += a1 * b0
                    h11 += a1 * b1
                    h12 += a1 * b2
                    h20 += a2 * b0
                    h21 += a2 * b1
                    h22 += a2 * b2
                    if a == b:
                        res = w * (dl[r - by0, c - bx0] - model[r - by0, c - bx0])
                        g0 += a0 * res
                        g1 += a1 * res
                        g2 += a2 * res
            blk = ((h00, h01, h02), (h10, h11, h12), (h20, h21, h22))
            for i in range(3):
                for j in range(3):
                    hm[3 * a + i, 3 * b + j] = blk[i][j]
                    hm[3 * b + j, 3 * a + i] = blk[i][j]
            if a == b:
                grad[3 * a] = g0
                grad[3 * a + 1] = g1
                grad[3 * a + 2] = g2
    return hm, grad


@kernel
def _cholesky_solve(m: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, bool]:
    """Solve m x = rhs (rhs (d, q)) for a symmetric positive definite m; (x, False) when m is
    not positive definite."""
    d = m.shape[0]
    lo = np.zeros((d, d))
    for j in range(d):
        s = m[j, j]
        for p in range(j):
            s -= lo[j, p] * lo[j, p]
        if not s > 0.0:
            return rhs.copy(), False
        ljj = math.sqrt(s)
        lo[j, j] = ljj
        for i in range(j + 1, d):
            s = m[i, j]
            for p in range(j):
                s -= lo[i, p] * lo[j, p]
            lo[i, j] = s / ljj
    x = rhs.copy()
    for q in range(x.shape[1]):
        for i in range(d):
            s = x[i, q]
            for p in range(i):
                s -= lo[i, p] * x[p, q]
            x[i, q] = s / lo[i, i]
        for i in range(d - 1, -1, -1):
            s = x[i, q]
            for p in range(i + 1, d):
                s -= lo[p, i] * x[p, q]
            x[i, q] = s / lo[i, i]
    return x, True


@kernel
def _solve(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """m x = rhs for a symmetric m. Small systems (a source or a small blend): Cholesky here,
    without LAPACK's call overhead; large ones (a crowded field's chain of blends, hundreds of
    sources): LAPACK. Where m is singular, the pseudo-inverse (as the array code)."""
    if m.shape[0] <= _SMALL_SYSTEM:
        x, ok = _cholesky_solve(m, rhs)
        if ok:
            return x
    else:
        try:
            return np.linalg.solve(m, rhs)
        except Exception:  # singular (LinAlgError)
            pass
    return np.linalg.pinv(m) @ rhs


@kernel
def _group_box(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, image: np.ndarray,
               weight: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The group's bounding box (clipped to the image): origin, weights on its stamps' pixels
    (0 elsewhere) and the data."""
    ny, nx = image.shape
    bx0, by0 = nx, ny
    bx1, by1 = -1, -1
    for a in range(mem.size):
        s = mem[a]
        bx0 = min(bx0, max(cx[s] - h, 0))
        by0 = min(by0, max(cy[s] - h, 0))
        bx1 = max(bx1, min(cx[s] + h, nx - 1))
        by1 = max(by1, min(cy[s] + h, ny - 1))
    nyb, nxb = max(by1 - by0 + 1, 0), max(bx1 - bx0 + 1, 0)
    wl = np.zeros((nyb, nxb))
    dl = np.zeros((nyb, nxb))
    for a in range(mem.size):
        s = mem[a]
        r0, r1 = _span(cy[s], h, 0, ny - 1)
        c0, c1 = _span(cx[s], h, 0, nx - 1)
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                wl[r - by0, c - bx0] = weight[r, c]
                dl[r - by0, c - bx0] = image[r, c]
    return bx0, by0, wl, dl


@kernel
def _trial(x: np.ndarray, y: np.ndarray, flux: np.ndarray, step: np.ndarray, x0: np.ndarray,
           y0: np.ndarray, shift_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parameters after a (flux, x, y) step: position steps capped at 0.5 px (trust region),
    positions kept within `shift_max` of the start (as `prf._trial`)."""
    k = x.size
    xn, yn, fn = np.empty(k), np.empty(k), np.empty(k)
    for a in range(k):
        dx, dy = step[3 * a + 1], step[3 * a + 2]
        big = max(abs(dx), abs(dy))
        scale = 0.5 / max(big, 1e-12) if big > 0.5 else 1.0
        fn[a] = flux[a] + step[3 * a]
        xn[a] = x0[a] + min(max(x[a] + dx * scale - x0[a], -shift_max), shift_max)
        yn[a] = y0[a] + min(max(y[a] + dy * scale - y0[a], -shift_max), shift_max)
    return xn, yn, fn


@kernel
def _group_prf(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, sigma: float,
               grid: np.ndarray, centre: int, oversample: int, xs: np.ndarray,
               ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The group's PRF on its stamps. The Gaussian of `sigma` (empty `grid`): its row and
    column factors (gx, gy, dgx, dgy), each (k, 2h+1). The tabulated PRF: its stamps and
    their derivatives in x and y (prof, dprof/dx, dprof/dy, prof again), each
    (k, (2h+1)^2)."""
    if grid.shape[0] == 0:
        gx, gy, dgx, dgy, _, _ = _profiles(mem, cx, cy, h, sigma, xs, ys, False)
        return gx, gy, dgx, dgy
    k = mem.size
    size = 2 * h + 1
    prof = np.zeros((k, size * size))
    ddx = np.zeros((k, size * size))
    ddy = np.zeros((k, size * size))
    inside = np.ones(size)  # pixels off the image are never visited (`_span`)
    for a in range(k):
        s = mem[a]
        _tabulated_stamp(grid, centre, oversample, cx[s] - h - xs[a], cy[s] - h - ys[a], size,
                         inside, inside, prof[a], ddx[a], ddy[a])
    return prof, ddx, ddy, prof


@kernel
def _add_model(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, flux: np.ndarray,
               prf: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tab: bool,
               bx0: int, by0: int, out: np.ndarray) -> None:
    """Add flux x PRF (from `_group_prf`) of each source's stamp to the bounding box `out`."""
    if not tab:
        _add_separable(mem, cx, cy, h, flux, prf[1], prf[0], bx0, by0, out)
        return
    nyb, nxb = out.shape
    size = 2 * h + 1
    stamps = prf[0]
    for a in range(mem.size):
        s = mem[a]
        r0, r1 = _span(cy[s], h, by0, by0 + nyb - 1)
        c0, c1 = _span(cx[s], h, bx0, bx0 + nxb - 1)
        for r in range(r0, r1 + 1):
            row = (r - cy[s] + h) * size - cx[s] + h
            for c in range(c0, c1 + 1):
                out[r - by0, c - bx0] += flux[a] * stamps[a, row + c]


@kernel
def _group_model(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, flux: np.ndarray,
                 prf: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tab: bool,
                 bx0: int, by0: int, out: np.ndarray) -> None:
    """Sum of the group's sources on its bounding box (out, zeroed here)."""
    out[:, :] = 0.0
    _add_model(mem, cx, cy, h, flux, prf, tab, bx0, by0, out)


@kernel
def _group_normal_equations(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int,
                            flux: np.ndarray,
                            prf: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                            tab: bool, wl: np.ndarray, dl: np.ndarray, model: np.ndarray,
                            bx0: int, by0: int) -> tuple[np.ndarray, np.ndarray]:
    """`_normal_equations` for the PRF of `_group_prf`. With the tabulated PRF the Jacobian's
    three columns of a source at a pixel are (P, f dP/dx, f dP/dy) of its stamp."""
    if not tab:
        return _normal_equations(mem, cx, cy, h, flux, prf[0], prf[1], prf[2], prf[3], wl,
                                 dl, model, bx0, by0)
    k = mem.size
    nyb, nxb = wl.shape
    size = 2 * h + 1
    hm = np.zeros((3 * k, 3 * k))
    grad = np.zeros(3 * k)
    blk = np.empty((3, 3))
    for a in range(k):
        sa = mem[a]
        for b in range(a, k):
            sb = mem[b]
            if abs(cx[sa] - cx[sb]) > 2 * h or abs(cy[sa] - cy[sb]) > 2 * h:
                continue
            blk[:, :] = 0.0
            r0 = max(max(cy[sa], cy[sb]) - h, by0)
            r1 = min(min(cy[sa], cy[sb]) + h, by0 + nyb - 1)
            c0 = max(max(cx[sa], cx[sb]) - h, bx0)
            c1 = min(min(cx[sa], cx[sb]) + h, bx0 + nxb - 1)
            for r in range(r0, r1 + 1):
                qa = (r - cy[sa] + h) * size - cx[sa] + h
                qb = (r - cy[sb] + h) * size - cx[sb] + h
                for c in range(c0, c1 + 1):
                    w = wl[r - by0, c - bx0]
                    if w == 0.0:
                        continue
                    ja = (prf[0][a, qa + c], flux[a] * prf[1][a, qa + c],
                          flux[a] * prf[2][a, qa + c])
                    jb = (prf[0][b, qb + c], flux[b] * prf[1][b, qb + c],
                          flux[b] * prf[2][b, qb + c])
                    for i in range(3):
                        for j in range(3):
                            blk[i, j] += ja[i] * w * jb[j]
                    if a == b:
                        res = w * (dl[r - by0, c - bx0] - model[r - by0, c - bx0])
                        for i in range(3):
                            grad[3 * a + i] += ja[i] * res
            hm[3 * a:3 * a + 3, 3 * b:3 * b + 3] = blk
            hm[3 * b:3 * b + 3, 3 * a:3 * a + 3] = blk.T
    return hm, grad


@kernel
def _fit_group(image: np.ndarray, weight: np.ndarray, mem: np.ndarray, cx: np.ndarray,
               cy: np.ndarray, h: int, sigma: float, grid: np.ndarray, centre: int,
               oversample: int, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
               xs0: np.ndarray, ys0: np.ndarray, shift_max: float, tol_px: float,
               tol_sigma: float, tol_chi2: float, max_iter: int, iterate: bool,
               var: np.ndarray, chi2_st: np.ndarray, npix: np.ndarray,
               residual: np.ndarray) -> bool:
    """Fit one group (sources `mem`) in place; writes its variances to `var`, each stamp's
    weighted squared residual and weighted pixel count to `chi2_st` and `npix`, and subtracts
    its model from `residual` (unless that is empty). Returns whether the group was still
    moving after `max_iter` iterations. The PRF: the Gaussian of `sigma`, or the tabulated
    `grid` when it is not empty (see `_group_prf`)."""
    k = mem.size
    bx0, by0, wl, dl = _group_box(mem, cx, cy, h, image, weight)
    xs, ys, fs = x[mem].copy(), y[mem].copy(), flux[mem].copy()
    x0s, y0s = xs0[mem], ys0[mem]
    model = np.empty_like(wl)
    trial_model = np.empty_like(wl)
    tab = grid.shape[0] > 0
    prf = _group_prf(mem, cx, cy, h, sigma, grid, centre, oversample, xs, ys)
    _group_model(mem, cx, cy, h, fs, prf, tab, bx0, by0, model)
    chi2 = _chi2(wl, dl, model)
    lam = 1e-3
    moving = False
    if iterate:
        moving = True
        for _ in range(max_iter):
            hm, grad = _group_normal_equations(mem, cx, cy, h, fs, prf, tab, wl, dl, model,
                                               bx0, by0)
            d = 3 * k
            diag_safe = np.empty(d)
            extra_one = np.zeros(d)
            for i in range(d):
                diag_safe[i] = hm[i, i] if hm[i, i] > 0.0 else 1.0
                extra_one[i] = 0.0 if hm[i, i] > 0.0 else 1.0
            accepted = False
            moved = 0.0
            gain = 0.0
            for _try in range(6):
                m = hm.copy()
                for i in range(d):
                    m[i, i] += lam * diag_safe[i] + extra_one[i]
                step = _solve(m, grad.reshape(d, 1))[:, 0]
                xn, yn, fn = _trial(xs, ys, fs, step, x0s, y0s, shift_max)
                trial_prf = _group_prf(mem, cx, cy, h, sigma, grid, centre, oversample, xn,
                                       yn)
                _group_model(mem, cx, cy, h, fn, trial_prf, tab, bx0, by0, trial_model)
                cn = _chi2(wl, dl, trial_model)
                if cn <= chi2 * (1.0 + 1e-12):
                    for a in range(k):
                        tol_src = max(tol_px, tol_sigma * math.sqrt(
                            1.0 / diag_safe[3 * a + 1] + 1.0 / diag_safe[3 * a + 2]))
                        moved = max(moved, math.hypot(xn[a] - xs[a], yn[a] - ys[a]) / tol_src)
                    xs, ys, fs = xn, yn, fn
                    prf = trial_prf
                    model, trial_model = trial_model, model
                    gain = chi2 - cn
                    chi2 = cn
                    lam = max(lam / 10.0, 1e-7)
                    accepted = True
                    break
                lam *= 10.0
            if not accepted or moved < 1.0 or gain < tol_chi2:
                moving = False
                break
    # Covariance: the undamped normal matrix at the solution.
    hm, _ = _group_normal_equations(mem, cx, cy, h, fs, prf, tab, wl, dl, model, bx0, by0)
    d = 3 * k
    ok = True
    for i in range(d):
        if not hm[i, i] > 0.0:
            ok = False
    for a in range(k):
        s = mem[a]
        x[s], y[s], flux[s] = xs[a], ys[a], fs[a]
    # Groups share no weighted pixel: on a stamp's weighted pixels, the group's model is the
    # whole model.
    nyb, nxb = wl.shape
    for a in range(k):
        s = mem[a]
        r0, r1 = _span(cy[s], h, by0, by0 + nyb - 1)
        c0, c1 = _span(cx[s], h, bx0, bx0 + nxb - 1)
        for r in range(r0 - by0, r1 - by0 + 1):
            for c in range(c0 - bx0, c1 - bx0 + 1):
                if wl[r, c] > 0.0:
                    chi2_st[s] += wl[r, c] * (dl[r, c] - model[r, c]) ** 2
                    npix[s] += 1
    if residual.size:
        residual[by0:by0 + nyb, bx0:bx0 + nxb] -= model
    if not ok:
        for a in range(k):
            for i in range(3):
                var[mem[a], i] = np.inf
        return moving
    inv = _solve(hm, np.eye(d))
    for a in range(k):
        for i in range(3):
            v = inv[3 * a + i, 3 * a + i]
            var[mem[a], i] = max(v, 0.0) if np.isfinite(v) else np.inf
    return moving


@kernel
def fit_groups(image: np.ndarray, weight: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int,
               sigma: float, grid: np.ndarray, centre: int, oversample: int,
               x: np.ndarray, y: np.ndarray, flux: np.ndarray,
               xs0: np.ndarray, ys0: np.ndarray, order: np.ndarray, group_start: np.ndarray,
               iterate: np.ndarray, shift_max: float, tol_px: float, tol_sigma: float,
               tol_chi2: float, max_iter: int, residual: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit every group (sources `order[group_start[g]:group_start[g + 1]]`, iterated where
    `iterate[g]`); x, y, flux updated in place, and the models subtracted from `residual`
    (the image's copy, or an empty array when no residual is wanted). Returns the variances
    (n, 3) of (flux, x, y); per group, whether it was still moving after `max_iter`
    iterations; each stamp's weighted squared residual and number of weighted pixels. The
    PRF is the Gaussian of `sigma`, or the zero-padded tabulated `grid` (centre index
    `centre`, `oversample` samples per pixel) when it is not empty."""
    n = x.size
    var = np.empty((n, 3))
    chi2_st = np.zeros(n)
    npix = np.zeros(n, dtype=np.int64)
    n_groups = group_start.size - 1
    moving = np.zeros(n_groups, dtype=np.bool_)
    for g in range(n_groups):
        mem = order[group_start[g]:group_start[g + 1]]
        moving[g] = _fit_group(image, weight, mem, cx, cy, h, sigma, grid, centre,
                               oversample, x, y, flux, xs0, ys0, shift_max, tol_px, tol_sigma,
                               tol_chi2, max_iter, iterate[g], var, chi2_st, npix,
                               residual)
    return var, moving, chi2_st, npix


@kernel
def shared_weighted_pixel(weight: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int,
                          pair_i: np.ndarray, pair_j: np.ndarray) -> np.ndarray:
    """Whether the stamps of each candidate pair share a pixel of non-zero weight."""
    ny, nx = weight.shape
    out = np.zeros(pair_i.size, dtype=np.bool_)
    for p in range(pair_i.size):
        i, j = pair_i[p], pair_j[p]
        r0 = max(max(cy[i], cy[j]) - h, 0)
        r1 = min(min(cy[i], cy[j]) + h, ny - 1)
        c0 = max(max(cx[i], cx[j]) - h, 0)
        c1 = min(min(cx[i], cx[j]) + h, nx - 1)
        found = False
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                if weight[r, c] > 0.0:
                    found = True
                    break
            if found:
                break
        out[p] = found
    return out


@kernel
def _model_dsigma(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, flux: np.ndarray,
                  gx: np.ndarray, gy: np.ndarray, sx: np.ndarray, sy: np.ndarray, bx0: int,
                  by0: int, out: np.ndarray) -> None:
    """d(model)/d(sigma) of the group on its bounding box (out, zeroed here): the separable
    profile's derivative is sy x gx + gy x sx."""
    out[:, :] = 0.0
    _add_separable(mem, cx, cy, h, flux, sy, gx, bx0, by0, out)
    _add_separable(mem, cx, cy, h, flux, gy, sx, bx0, by0, out)


@kernel
def _sigma_terms(mem: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, flux: np.ndarray,
                 gx: np.ndarray, gy: np.ndarray, dgx: np.ndarray, dgy: np.ndarray,
                 wl: np.ndarray, dl: np.ndarray, model: np.ndarray, js: np.ndarray, bx0: int,
                 by0: int) -> tuple[np.ndarray, float, float]:
    """The group's coupling of (flux, x, y) with sigma, J^T W J_sigma (3k), and its
    J_sigma^T W J_sigma and J_sigma^T W r."""
    k = mem.size
    nyb, nxb = wl.shape
    couple = np.zeros(3 * k)
    for a in range(k):
        s = mem[a]
        r0, r1 = _span(cy[s], h, by0, by0 + nyb - 1)
        c0, c1 = _span(cx[s], h, bx0, bx0 + nxb - 1)
        f = flux[a]
        for r in range(r0, r1 + 1):
            i = r - cy[s] + h
            for c in range(c0, c1 + 1):
                j = c - cx[s] + h
                wj = wl[r - by0, c - bx0] * js[r - by0, c - bx0]
                couple[3 * a] += gy[a, i] * gx[a, j] * wj
                couple[3 * a + 1] += f * gy[a, i] * dgx[a, j] * wj
                couple[3 * a + 2] += f * dgy[a, i] * gx[a, j] * wj
    d_ss = 0.0
    g_s = 0.0
    for r in range(nyb):
        for c in range(nxb):
            w = wl[r, c]
            if w > 0.0:
                d_ss += w * js[r, c] * js[r, c]
                g_s += w * js[r, c] * (dl[r, c] - model[r, c])
    return couple, d_ss, g_s


@kernel
def _groups_chi2(image: np.ndarray, weight: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int,
                 sigma: float, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                 order: np.ndarray, group_start: np.ndarray) -> float:
    """Total chi^2 of all groups."""
    total = 0.0
    for g in range(group_start.size - 1):
        mem = order[group_start[g]:group_start[g + 1]]
        bx0, by0, wl, dl = _group_box(mem, cx, cy, h, image, weight)
        gx, gy, _, _, _, _ = _profiles(mem, cx, cy, h, sigma, x[mem], y[mem], False)
        model = np.empty_like(wl)
        _model(mem, cx, cy, h, flux[mem], gx, gy, bx0, by0, model)
        total += _chi2(wl, dl, model)
    return total


@kernel
def fit_common_sigma(image: np.ndarray, weight: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                     h: int, sigma: float, s_lo: float, s_hi: float, x: np.ndarray,
                     y: np.ndarray, flux: np.ndarray, order: np.ndarray,
                     group_start: np.ndarray, shift_max: float, max_iter: int,
                     tol: float) -> tuple[float, np.ndarray]:
    """One Gaussian sigma common to all sources, fitted with every source's flux and position
    (x, y, flux updated in place): Levenberg-Marquardt on all parameters, sigma eliminated
    from the block-diagonal source system by a Schur complement (as `prf.fit_common_fwhm`).
    Returns sigma and each source's preferred sigma step on its own stamp (one Gauss-Newton
    step in sigma alone, for rejecting blends)."""
    n = x.size
    n_groups = group_start.size - 1
    xs0, ys0 = x.copy(), y.copy()
    hoff = np.zeros(n_groups + 1, dtype=np.int64)
    for g in range(n_groups):
        d = 3 * (group_start[g + 1] - group_start[g])
        hoff[g + 1] = hoff[g] + d * d
    hbuf = np.empty(hoff[-1])
    grad = np.empty(3 * n)  # in `order`
    couple = np.empty(3 * n)
    chi2 = _groups_chi2(image, weight, cx, cy, h, sigma, x, y, flux, order, group_start)
    lam = 1e-3
    for _ in range(max_iter):
        d_ss = 0.0
        g_s = 0.0
        for g in range(n_groups):
            mem = order[group_start[g]:group_start[g + 1]]
            bx0, by0, wl, dl = _group_box(mem, cx, cy, h, image, weight)
            xs, ys, fs = x[mem], y[mem], flux[mem]
            gx, gy, dgx, dgy, sx, sy = _profiles(mem, cx, cy, h, sigma, xs, ys, True)
            model = np.empty_like(wl)
            _model(mem, cx, cy, h, fs, gx, gy, bx0, by0, model)
            js = np.empty_like(wl)
            _model_dsigma(mem, cx, cy, h, fs, gx, gy, sx, sy, bx0, by0, js)
            hm, gr = _normal_equations(mem, cx, cy, h, fs, gx, gy, dgx, dgy, wl, dl, model,
                                       bx0, by0)
            cp, dss, gss = _sigma_terms(mem, cx, cy, h, fs, gx, gy, dgx, dgy, wl, dl, model,
                                        js, bx0, by0)
            d_ss += dss
            g_s += gss
            hbuf[hoff[g]:hoff[g + 1]] = hm.ravel()
            p0 = 3 * group_start[g]
            grad[p0:p0 + gr.size] = gr
            couple[p0:p0 + cp.size] = cp
        accepted = False
        ds = 0.0
        for _try in range(8):
            u = np.empty(3 * n)
            v = np.empty(3 * n)
            cu = 0.0
            cv = 0.0
            for g in range(n_groups):
                p0, p1 = 3 * group_start[g], 3 * group_start[g + 1]
                d = p1 - p0
                m = hbuf[hoff[g]:hoff[g + 1]].copy().reshape(d, d)
                for i in range(d):
                    # lam x diag, and lam + 1 where a parameter has no data (as prf.py)
                    m[i, i] += lam * m[i, i] if m[i, i] > 0.0 else lam + 1.0
                rhs = np.empty((d, 2))
                rhs[:, 0] = grad[p0:p1]
                rhs[:, 1] = couple[p0:p1]
                sol = _solve(m, rhs)
                u[p0:p1] = sol[:, 0]
                v[p0:p1] = sol[:, 1]
                for i in range(d):
                    cu += couple[p0 + i] * sol[i, 0]
                    cv += couple[p0 + i] * sol[i, 1]
            schur = d_ss * (1.0 + lam) - cv
            ds = (g_s - cu) / max(schur, 1e-300)
            ds = min(max(ds, -0.2 * sigma), 0.2 * sigma)
            sn = min(max(sigma + ds, s_lo), s_hi)
            xn, yn, fn = x.copy(), y.copy(), flux.copy()
            for g in range(n_groups):
                mem = order[group_start[g]:group_start[g + 1]]
                p0, p1 = 3 * group_start[g], 3 * group_start[g + 1]
                step = u[p0:p1] - v[p0:p1] * ds
                tx, ty, tf = _trial(x[mem], y[mem], flux[mem], step, xs0[mem], ys0[mem],
                                    shift_max)
                xn[mem], yn[mem], fn[mem] = tx, ty, tf
            cn = _groups_chi2(image, weight, cx, cy, h, sn, xn, yn, fn, order, group_start)
            if cn <= chi2 * (1.0 + 1e-12):
                accepted = True
                ds = sn - sigma
                x[:], y[:], flux[:] = xn, yn, fn
                sigma = sn
                chi2 = cn
                lam = max(lam / 10.0, 1e-7)
                break
            lam *= 10.0
        if not accepted or abs(ds) < tol * sigma:
            break
    # Each source's preferred sigma: a Gauss-Newton step in sigma alone on its own stamp.
    step_s = np.zeros(n)
    for g in range(n_groups):
        mem = order[group_start[g]:group_start[g + 1]]
        bx0, by0, wl, dl = _group_box(mem, cx, cy, h, image, weight)
        gx, gy, _, _, sx, sy = _profiles(mem, cx, cy, h, sigma, x[mem], y[mem], True)
        model = np.empty_like(wl)
        _model(mem, cx, cy, h, flux[mem], gx, gy, bx0, by0, model)
        nyb, nxb = wl.shape
        for a in range(mem.size):
            s = mem[a]
            r0, r1 = _span(cy[s], h, by0, by0 + nyb - 1)
            c0, c1 = _span(cx[s], h, bx0, bx0 + nxb - 1)
            num = 0.0
            den = 0.0
            for r in range(r0, r1 + 1):
                i = r - cy[s] + h
                for c in range(c0, c1 + 1):
                    j = c - cx[s] + h
                    w = weight[r, c]
                    js = flux[s] * (sy[a, i] * gx[a, j] + gy[a, i] * sx[a, j])
                    num += w * (dl[r - by0, c - bx0] - model[r - by0, c - bx0]) * js
                    den += w * js * js
            step_s[s] = num / max(den, 1e-300)
    return sigma, step_s


@kernel
def _keys(t: float, w: np.ndarray, dw: np.ndarray) -> None:
    """Cubic convolution (Keys, a = -0.5) weights of the samples at -1, 0, 1, 2 for the
    fractional position t in [0, 1), and their derivatives in t (as `prf._keys_weights`)."""
    t2 = t * t
    t3 = t2 * t
    w[0] = (-t3 + 2 * t2 - t) / 2
    w[1] = (3 * t3 - 5 * t2 + 2) / 2
    w[2] = (-3 * t3 + 4 * t2 + t) / 2
    w[3] = (t3 - t2) / 2
    dw[0] = (-3 * t2 + 4 * t - 1) / 2
    dw[1] = (9 * t2 - 10 * t) / 2
    dw[2] = (-9 * t2 + 8 * t + 1) / 2
    dw[3] = (3 * t2 - 2 * t) / 2


@kernel
def _tabulated_stamp(grid: np.ndarray, centre: int, oversample: int, first_dx: float,
                     first_dy: float, size: int, mask_x: np.ndarray, mask_y: np.ndarray,
                     prof: np.ndarray, ddx: np.ndarray, ddy: np.ndarray,
                     derivatives: bool = True) -> None:
    """One stamp of `tabulated_stamps` (rows of size * size values; masks of size); without
    `derivatives`, the values alone (ddx, ddy untouched)."""
    k = oversample
    last = grid.shape[0] - 1
    wx, dwx, wy, dwy = np.empty(4), np.empty(4), np.empty(4), np.empty(4)
    tx = centre + k * first_dx
    ty = centre + k * first_dy
    bx, by = math.floor(tx), math.floor(ty)
    _keys(tx - bx, wx, dwx)
    _keys(ty - by, wy, dwy)
    for a in range(size):
        if mask_y[a] == 0.0:
            continue
        for b in range(size):
            if mask_x[b] == 0.0:
                continue
            m = mask_y[a] * mask_x[b]
            p = 0.0
            px = 0.0
            py = 0.0
            for li in range(4):
                row = min(max(by + li - 1 + k * a, 0), last)
                along = 0.0
                dalong = 0.0
                for mi in range(4):
                    g = grid[row, min(max(bx + mi - 1 + k * b, 0), last)]
                    along += g * wx[mi]
                    if derivatives:
                        dalong += g * dwx[mi]
                p += along * wy[li]
                if derivatives:
                    px += dalong * wy[li]
                    py += along * dwy[li]
            prof[a * size + b] = p * m
            if derivatives:
                # The pixel offset is (pixel - source): d/d(source x) = -oversample d/dt.
                ddx[a * size + b] = -k * px * m
                ddy[a * size + b] = -k * py * m


@kernel
def tabulated_stamps(grid: np.ndarray, centre: int, oversample: int, first_dx: np.ndarray,
                     first_dy: np.ndarray, size: int, mask_x: np.ndarray, mask_y: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`prf.TabulatedPrf.stamps`: the tabulated PRF (zero-padded `grid`, centre index
    `centre`) on n stamps of size x size pixels, the first pixel at (first_dx, first_dy) from
    the source, and its derivatives in the source's x and y; each (n, size * size), zero on
    the masked rows and columns."""
    n = first_dx.size
    prof = np.zeros((n, size * size))
    ddx = np.zeros((n, size * size))
    ddy = np.zeros((n, size * size))
    for s in range(n):
        _tabulated_stamp(grid, centre, oversample, first_dx[s], first_dy[s], size, mask_x[s],
                         mask_y[s], prof[s], ddx[s], ddy[s])
    return prof, ddx, ddy


@kernel
def add_wings(out: np.ndarray, grid: np.ndarray, centre: int, oversample: int, radius: int,
              core_half: int, cx: np.ndarray, cy: np.ndarray, x: np.ndarray, y: np.ndarray,
              flux: np.ndarray) -> None:
    """Add flux x the tabulated PRF (as `tabulated_stamps`) on each source's square of
    half-size `radius` around the pixel (cx, cy) to `out`, except on its central square of
    half-size `core_half`; pixels off the image are skipped."""
    ny, nx = out.shape
    size = 2 * radius + 1
    prof = np.zeros(size * size)
    unused = np.zeros(0)
    inside = np.ones(size)
    for s in range(x.size):
        _tabulated_stamp(grid, centre, oversample, cx[s] - radius - x[s], cy[s] - radius - y[s],
                         size, inside, inside, prof, unused, unused, False)
        for a in range(size):
            row = cy[s] - radius + a
            if row < 0 or row >= ny:
                continue
            core_row = abs(a - radius) <= core_half
            for b in range(size):
                col = cx[s] - radius + b
                if col < 0 or col >= nx or (core_row and abs(b - radius) <= core_half):
                    continue
                out[row, col] += prof[a * size + b] * flux[s]
