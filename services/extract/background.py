"""Smooth background and background-noise maps of an image (mesh of clipped modes, APEX-like)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from services.extract.jit import kernel


def _clipped_mesh_stats(
    cells: np.ndarray, *, nsigma: float, n_iter: int, wing_rms_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped level, RMS and number of kept values of each row of `cells` (NaN =
    absent).

    `cells` is sorted in place (callers pass a scratch array): every clip then keeps a
    contiguous run of the sorted row, whose ends are found by bisection and whose median is
    an index (`_clipped_sorted_rows`, compiled). Level: the SExtractor mode estimate
    2.5 median - 1.5 mean of the kept values, or their median where the cell is crowded
    (|mean - median| >= 0.3 sigma) or, with `wing_rms_factor`, holds a bright source's wings
    (RMS > that factor x the median row's: the wings survive the clip and inflate the sigma
    the crowding test uses, and their skew is not the faint-source skew the mode corrects);
    NaN where no value is kept; RMS NaN below two values.
    """
    cells.sort(axis=1)  # NaNs sort last: a row's finite values are its first `nvalid`
    med, mean, std, cnt = _clipped_sorted_rows(cells, float(nsigma), int(n_iter))
    rms = np.where(cnt > 1, std, np.nan)
    crowded = np.abs(mean - med) >= 0.3 * np.maximum(std, 1e-30)
    if wing_rms_factor is not None and np.any(np.isfinite(rms)):
        with np.errstate(invalid="ignore"):
            crowded |= rms > wing_rms_factor * float(np.nanmedian(rms))
    level = np.where(cnt > 0, np.where(crowded, med, 2.5 * med - 1.5 * mean), np.nan)
    return level, rms, cnt


#: A cell whose clipped RMS exceeds the image's typical one by this factor holds the wings of
#: a bright source (next to a source of S/N 10^5 the mode came out 0.44 sigma below the sky,
#: and noise peaks beside it were detected): it takes its clipped median.
WING_RMS_FACTOR = 1.3


@kernel
def _count_below(row: np.ndarray, n: int, value: float, inclusive: bool) -> int:
    """How many of the ascending row[:n] are < `value` (<= with `inclusive`); 0 for NaN."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if row[mid] < value or (inclusive and row[mid] == value):
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _clipped_sorted_rows(
    s: np.ndarray, nsigma: float, n_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, mean, RMS and count of the kept run of rows already sorted ascending (NaNs
    last): per row, up to `n_iter` clips at median +- nsigma x RMS of the kept run, stopping
    when the run no longer changes (`_clipped_mesh_stats` makes the level of them)."""
    nrow, ncol = s.shape
    last = ncol - 1
    median = np.empty(nrow)
    average = np.empty(nrow)
    rms = np.empty(nrow)
    count = np.empty(nrow, dtype=np.int64)
    for r in range(nrow):
        row = s[r]
        nvalid = 0
        for k in range(ncol):
            if not np.isnan(row[k]):
                nvalid += 1
        lo, hi = 0, nvalid
        sum1 = 0.0
        sum2 = 0.0
        for k in range(lo, hi):
            sum1 += row[k]
            sum2 += row[k] * row[k]
        for _ in range(n_iter):
            cnt = max(hi - lo, 1)
            med = 0.5 * (row[min(max(lo + (hi - lo - 1) // 2, 0), last)]
                         + row[min(max(lo + (hi - lo) // 2, 0), last)])
            mean = sum1 / cnt
            std = math.sqrt(max(sum2 / cnt - mean * mean, 0.0))
            lo_new = _count_below(row, nvalid, med - nsigma * std, False)
            hi_new = max(min(_count_below(row, nvalid, med + nsigma * std, True), nvalid),
                         lo_new)
            if lo_new == lo and hi_new == hi:
                break
            lo, hi = lo_new, hi_new
            sum1 = 0.0
            sum2 = 0.0
            for k in range(lo, hi):
                sum1 += row[k]
                sum2 += row[k] * row[k]
        cnt = hi - lo
        safe = max(cnt, 1)
        med = 0.5 * (row[min(max(lo + (hi - lo - 1) // 2, 0), last)]
                     + row[min(max(lo + (hi - lo) // 2, 0), last)])
        mean = sum1 / safe
        std = math.sqrt(max(sum2 / safe - mean * mean, 0.0))
        # A clipped (truncated at +-3 sigma) Gaussian has a slightly smaller RMS than its
        # sigma.
        if nsigma == 3.0:
            std = std / 0.9866
        median[r] = med
        average[r] = mean
        rms[r] = std
        count[r] = cnt
    return median, average, rms, count


def estimate_background(
    image: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    box_px: int = 32,
    filter_size: int = 3,
    filter_threshold: float = 0.3,
    nsigma: float = 3.0,
    min_valid_fraction: float = 0.35,
) -> tuple[np.ndarray, np.ndarray]:
    """Background level and background RMS of `image`, both in the image unit, full resolution.

    The image is cut into `box_px` x `box_px` cells; each cell gets a 3-sigma-clipped level
    (mode = 2.5 median - 1.5 mean where the cell is not crowded) and RMS; cells with fewer than
    `min_valid_fraction` usable pixels take the value of the nearest good cell; cells differing
    from the median of their `filter_size` x `filter_size` neighbourhood by more than
    `filter_threshold` x RMS take that median; the grid is interpolated bicubically (and
    extrapolated along the gradient at the edges) to every pixel.
    `mask` is True where a pixel must be ignored (no coverage, bad, a source).
    Raises `BackgroundError` when no cell has enough usable pixels.
    """
    img = np.asarray(image, dtype=float)
    if img.ndim != 2:
        raise BackgroundError(f"image must be 2-D, got shape {img.shape}")
    bad = ~np.isfinite(img)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    ny, nx = img.shape
    box = int(max(4, min(box_px, ny, nx)))
    # Cell sides adjusted so that the last row/column of cells is (nearly) full: a thin edge
    # cell would be noisy and is extrapolated from.
    gy, gx = max(1, round(ny / box)), max(1, round(nx / box))
    by, bx = -(-ny // gy), -(-nx // gx)
    # The usable pixels' values (NaN elsewhere) and one spare NaN after them, gathered cell by
    # cell: the cells' padding past the image edge points at the spare NaN, and each cell row
    # ends with one more NaN.
    index_all, index_third = _cell_index(ny, nx, gy, gx, by, bx)
    vals = np.empty(ny * nx + 1)
    vals[-1] = np.nan
    vals_2d = vals[:-1].reshape(ny, nx)
    np.copyto(vals_2d, img)
    np.copyto(vals_2d, np.nan, where=bad)
    cells = vals[index_all]
    # Real (in-image) pixels per cell: the last row/column of cells may be partial.
    rows_in = np.clip(ny - np.arange(gy) * by, 0, by)
    cols_in = np.clip(nx - np.arange(gx) * bx, 0, bx)
    area = (rows_in[:, None] * cols_in[None, :]).ravel()
    level, rms, cnt = _clipped_mesh_stats(cells, nsigma=nsigma, n_iter=5,
                                          wing_rms_factor=WING_RMS_FACTOR)
    # Where in each cell its usable pixels are: on a sloped sky, a cell cut by the coverage
    # edge measures the level at the centroid of its pixels, not at its centre.
    # Sums of the usable pixels' row and column indices per cell, separably (integers: exact).
    usable = np.zeros((gy * by, gx * bx), dtype=bool)
    np.logical_not(bad, out=usable[:ny, :nx])
    per_row = usable.reshape(gy * by, gx, bx).sum(axis=2)  # (rows, cells across)
    per_col = usable.reshape(gy, by, gx * bx).sum(axis=1)  # (cells down, columns)
    ucount = per_row.reshape(gy, by, gx).sum(axis=1).ravel()
    sum_y = (per_row * np.arange(gy * by)[:, None]).reshape(gy, by, gx).sum(axis=1).ravel()
    sum_x = (per_col * np.arange(gx * bx)[None, :]).reshape(gy, gx, bx).sum(axis=2).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = sum_y / ucount
        cx = sum_x / ucount
    good = (cnt >= min_valid_fraction * area) & np.isfinite(level) & np.isfinite(rms)
    if not np.any(good):
        raise BackgroundError(
            "no background cell has enough usable pixels: check the coverage/mask or use a "
            "larger box_px"
        )
    # On a sloped sky, a cell cut by the coverage edge measures the level at the centroid of
    # its usable pixels, and an empty cell has none: a smooth polynomial surface through the
    # good cells (at their centroids) moves each level to its cell centre and fills the empty
    # cells, which a nearest-cell fill would flatten.
    surface = _quadratic_surface(cy[good], cx[good], level[good], weights=cnt[good])
    ccy = ((np.arange(gy) + 0.5) * by - 0.5)[:, None] * np.ones((1, gx))
    ccx = ((np.arange(gx) + 0.5) * bx - 0.5)[None, :] * np.ones((gy, 1))
    centre = surface(ccy.ravel(), ccx.ravel())
    # Far from the data (an empty corner of a narrow, rotated footprint) a polynomial runs away:
    # an empty cell takes the surface only within the range the good cells measured.
    fill = np.clip(centre, float(np.min(level[good])), float(np.max(level[good])))
    shifted = level + centre - surface(np.nan_to_num(cy), np.nan_to_num(cx))
    level = np.where(good, shifted, fill).reshape(gy, gx)
    rms = rms.reshape(gy, gx)
    good = good.reshape(gy, gx)
    if not np.all(good):
        _, (iy, ix) = ndimage.distance_transform_edt(~good, return_indices=True)
        rms = rms[iy, ix]
    if filter_size > 1 and min(gy, gx) >= 4:
        # Like SExtractor's BACK_FILTERTHRESH: only cells that stand out from their neighbours
        # by more than `filter_threshold` x RMS are replaced (a source-contaminated cell), so
        # that a smoothly curved background is not flattened by the median filter. The filter
        # runs on the grid minus the smooth surface: a 2-D median filter biases a sloped grid.
        trend = centre.reshape(gy, gx)
        level_f = trend + ndimage.median_filter(level - trend, size=filter_size, mode="nearest")
        rms_f = ndimage.median_filter(rms, size=filter_size, mode="nearest")
        out = np.abs(level - level_f) > filter_threshold * rms_f
        level = np.where(out, level_f, level)
        rms = np.where(out, rms_f, rms)
    bkg = _to_full(level, by, bx, ny, nx, trend=surface)
    # The RMS of the cells themselves includes the sky gradient across a cell: measure it
    # again on the background-subtracted image (one clipped pass, cells as before).
    # `vals` is reused for the residual (same layout, same spare NaN).
    np.subtract(img, bkg, out=vals_2d)
    np.copyto(vals_2d, np.nan, where=bad)
    # Every 3rd pixel of a cell is plenty for an RMS and a third of the sorting cost.
    _, rms2, _ = _clipped_mesh_stats(vals[index_third], nsigma=nsigma, n_iter=3)
    rms2 = rms2.reshape(gy, gx)
    fill = ~np.isfinite(rms2) | ~good
    if np.all(fill):
        rms2 = rms
    elif np.any(fill):
        _, (iy, ix) = ndimage.distance_transform_edt(fill, return_indices=True)
        rms2 = rms2[iy, ix]
    return bkg, np.maximum(_to_full(rms2, by, bx, ny, nx), 0.0)


# A few geometries only: an entry holds 8 bytes per image pixel (a service lives long).
@functools.lru_cache(maxsize=4)
def _cell_index(
    ny: int, nx: int, gy: int, gx: int, by: int, bx: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel indices of the `by` x `bx` cells of a `gy` x `gx` mesh over an (ny, nx)
    image, one row per cell (cells row by row, pixels row by row within a cell), each row
    ending with one extra entry; the extra entries and the cell pixels past the image edge are
    ny * nx (a spare entry after the image). Also every 3rd pixel of each cell with the same
    extra entry. Cached per geometry (read-only)."""
    py = np.arange(gy * by).reshape(gy, 1, by, 1)
    px = np.arange(gx * bx).reshape(1, gx, 1, bx)
    flat = np.where((py < ny) & (px < nx), py * nx + px, ny * nx).reshape(gy * gx, by * bx)
    spare = np.full((gy * gx, 1), ny * nx)
    index_all = np.concatenate([flat, spare], axis=1)
    index_third = np.concatenate([flat[:, ::3], spare], axis=1)
    index_all.flags.writeable = False
    index_third.flags.writeable = False
    return index_all, index_third


def _quadratic_surface(
    y: np.ndarray, x: np.ndarray, values: np.ndarray, *, weights: np.ndarray
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Weighted least-squares polynomial surface through scattered (y, x, value) points, with
    3-sigma clips; returns a function of (y, x). The order follows the number of points (>= 2
    per term): cubic from 20, quadratic from 12, a plane from 6, else a constant."""
    if values.size < 6:
        const = float(np.median(values))
        return lambda yq, xq: np.full(np.broadcast(yq, xq).shape, const)
    y0, x0 = float(np.mean(y)), float(np.mean(x))
    scale = max(float(np.ptp(y)), float(np.ptp(x)), 1.0)

    order = 3 if values.size >= 20 else 2 if values.size >= 12 else 1
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]

    def design(yq: np.ndarray, xq: np.ndarray) -> np.ndarray:
        u, v = (np.asarray(xq) - x0) / scale, (np.asarray(yq) - y0) / scale
        return np.stack([u**i * v**j for i, j in powers], axis=-1)

    a = design(y, x)
    sw = np.sqrt(np.asarray(weights, dtype=float))
    keep = np.ones(values.size, dtype=bool)
    coef = np.zeros(a.shape[1])
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep] * sw[keep, None], values[keep] * sw[keep], rcond=None)
        res = values - a @ coef
        mad = 1.4826 * np.median(np.abs(res[keep] - np.median(res[keep])))
        keep = np.abs(res) <= 3.0 * max(mad, 1e-30)

    def evaluate(yq: np.ndarray, xq: np.ndarray) -> np.ndarray:
        return np.asarray(design(yq, xq) @ coef)

    return evaluate


def _to_full(grid: np.ndarray, by: int, bx: int, ny: int, nx: int, *,
             trend: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             ) -> np.ndarray:
    """Bicubic (or lower order on small grids) interpolation of cell values to every pixel.
    The edge half-cells follow `trend` (a smooth surface through the cells: its value one cell
    beyond the edge plus the edge cell's own departure from it), else the gradient between
    the last two cells."""
    gy, gx = grid.shape
    if gy == 1 and gx == 1:
        return np.full((ny, nx), grid[0, 0])
    yc = (np.arange(gy) + 0.5) * by - 0.5
    xc = (np.arange(gx) + 0.5) * bx - 0.5
    if gy == 1:
        return np.broadcast_to(np.interp(np.arange(nx), xc, grid[0]), (ny, nx)).copy()
    if gx == 1:
        return np.broadcast_to(np.interp(np.arange(ny), yc, grid[:, 0])[:, None], (ny, nx)).copy()
    # The last cell may be partial: put its centre in the middle of its real pixels.
    yc[-1] = 0.5 * ((gy - 1) * by + ny - 1)
    xc[-1] = 0.5 * ((gx - 1) * bx + nx - 1)
    # Pad the grid by one cell on each side, so that the edge half-cells follow the sky's
    # gradient instead of a free spline end. The difference of the last two cells is that
    # gradient plus twice their noise (the edges of a pure-noise image came out at +-0.27
    # sigma with 33 px cells): with a trend, the padding is the trend's own gradient.
    yc = np.concatenate([[2 * yc[0] - yc[1]], yc, [2 * yc[-1] - yc[-2]]])
    xc = np.concatenate([[2 * xc[0] - xc[1]], xc, [2 * xc[-1] - xc[-2]]])
    if trend is None:
        grid = _pad_linear(grid)
    else:
        smooth = trend(yc[:, None] * np.ones((1, xc.size)), np.ones((yc.size, 1)) * xc[None, :])
        grid = smooth + np.pad(grid - smooth[1:-1, 1:-1], 1, mode="edge")
    # Separable cubic-spline interpolation as two small matrix products (weights of each grid
    # node at every output row/column): the same surface as a bicubic spline, much faster.
    wy = _spline_weights(yc, ny)
    wx = _spline_weights(xc, nx)
    return _single_thread_matmul(wy @ grid, wx.T)


def _pad_linear(grid: np.ndarray) -> np.ndarray:
    """`grid` (at least 2 x 2) padded by one cell on each side, linearly extrapolated:
    np.pad(grid, 1, mode="reflect", reflect_type="odd"), the same values, without np.pad's
    overhead (which costs more than the arithmetic on a grid this small)."""
    out = np.empty((grid.shape[0] + 2, grid.shape[1] + 2))
    out[1:-1, 1:-1] = grid
    out[0, 1:-1] = 2 * grid[0] - grid[1]
    out[-1, 1:-1] = 2 * grid[-1] - grid[-2]
    out[:, 0] = 2 * out[:, 1] - out[:, 2]
    out[:, -1] = 2 * out[:, -2] - out[:, -3]
    return out


#: Products up to this many multiply-adds run in single-threaded blocks (`_single_thread_matmul`).
_BLOCKED_MAX = 1 << 24


def _single_thread_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in row blocks small enough that OpenBLAS runs each on the calling thread.

    OpenBLAS threads a GEMM above 2^18 multiply-adds; for a product this small (~2e6) waking
    its threads costs more than the work, and on a busy machine much more (measured on the
    bench mosaic: 1.2 ms mean with spikes past 10 ms, against 0.2 ms in blocks). Every row
    is computed as in one product, so the result is the same. A large product (a mosaic of
    millions of pixels: above `_BLOCKED_MAX` multiply-adds) is worth the threads, and blocks
    of a few rows would waste the BLAS kernel: it is one product (measured: 1600^2 pixels
    from a 46^2 mesh, 82 ms in blocks against 12 ms whole; 800^2, 2.4 ms against 5.4 ms).
    """
    if a.shape[0] * a.shape[1] * b.shape[1] > _BLOCKED_MAX:
        return np.asarray(a @ b)
    rows = max(1, (1 << 18) // max(1, b.shape[0] * b.shape[1]) - 1)
    out = np.empty((a.shape[0], b.shape[1]))
    for i in range(0, a.shape[0], rows):
        np.matmul(a[i : i + rows], b, out=out[i : i + rows])
    return out


def _spline_weights(nodes: np.ndarray, n: int) -> np.ndarray:
    """(n, len(nodes)) matrix W such that W @ values interpolates `values` given at `nodes`
    (natural cubic spline, or linear for fewer than 4 nodes) at 0..n-1."""
    # The level and the RMS grids share their nodes: the weights are computed once.
    return _spline_weights_cached(np.asarray(nodes, dtype=float).tobytes(), n)


@functools.lru_cache(maxsize=16)
def _spline_weights_cached(nodes_bytes: bytes, n: int) -> np.ndarray:
    nodes = np.frombuffer(nodes_bytes, dtype=float)
    eye = np.eye(nodes.size)
    out = np.arange(n, dtype=float)
    if nodes.size < 4:
        w = np.stack([np.interp(out, nodes, col) for col in eye], axis=1)
    else:
        w = np.asarray(CubicSpline(nodes, eye, bc_type="natural", axis=0)(out))
    w.flags.writeable = False  # shared by every caller through the cache
    return w


class BackgroundError(ValueError):
    """The background cannot be estimated from this image (no usable pixels)."""
