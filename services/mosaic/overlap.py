"""Overlap background matching: per-frame additive offsets that level the mosaic's seams.

Like MOPEX Overlap, the offsets minimise the uncertainty-weighted differences of overlapping
data, with sum(offsets) = 0 (the matching levels the frames but does not remove the sky).
Overlaps are measured cheaply: the output grid is cut into coarse cells (`cell_px` output
pixels square); the sigma-clipped mean of a frame in a cell it fully covers is one
measurement m_fc. A second pass, on the corrected samples, refers each sample to the median
of all samples at its output pixel first, so the sky's structure inside a cell (sources,
gradients) cancels even where frames sample the cell differently (pixels much larger than
the output grid's, e.g. MIPS 70 um, where raw cell means differ by the sources' sub-pixel
phases and alone made the offsets noisier than the drifts they remove).
The model m_fc = sky_c + offset_f, solved for all cells and frames by weighted least squares
with the cell skies eliminated, gives a sparse frame-by-frame graph Laplacian (N frames x N
frames, never pixels x pixels) solved by preconditioned conjugate gradients. A few
iteratively reweighted passes drop cells where a frame disagrees (a source or artefact that
one frame sees differently).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

from services.mosaic.resample import Samples


def group_medians(
    keys: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median of `values` within each distinct non-negative integer `keys` value, no loop.

    Returns (unique keys, medians, counts, inverse) where `inverse` maps each input entry to
    its group's position in the unique arrays. One float64 argsort of key + scaled value
    (3x faster than `np.lexsort`); values closer than ~1e-10 of their range may tie, which
    moves a median by at most that much.
    """
    if keys.size == 0:
        empty = np.zeros(0)
        return keys[:0], empty, empty.astype(np.int64), np.zeros(0, dtype=np.int64)
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    vmin = float(v[finite].min()) if finite.any() else 0.0
    vmax = float(v[finite].max()) if finite.any() else 1.0
    span = vmax - vmin if vmax > vmin else 1.0
    if int(keys.max()) < (1 << 20):
        scaled = np.clip((v - vmin) / span, 0.0, 1.0) * 0.999
        order = np.argsort(keys.astype(np.float64) + scaled)
    else:  # too many groups for the packed key's precision
        order = np.lexsort((v, keys))
    sk = keys[order]
    sv = v[order]
    is_start = np.empty(sk.size, dtype=bool)
    is_start[0] = True
    np.not_equal(sk[1:], sk[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    counts = np.diff(np.r_[starts, sk.size])
    med = 0.5 * (sv[starts + (counts - 1) // 2] + sv[starts + counts // 2])
    inverse = np.empty(keys.size, dtype=np.int64)
    inverse[order] = np.cumsum(is_start) - 1
    return sk[starts], med, counts, inverse


def group_clipped_means(
    keys: np.ndarray,
    values: np.ndarray,
    *,
    n_keys: int,
    clip: float = 2.5,
    n_iter: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Iteratively sigma-clipped mean of `values` per integer key in [0, n_keys), no sort.

    Returns (mean, count of kept values); robust to cosmic rays and to the wings of sources
    at a fraction of a sort's cost (bincount only).
    """
    v = values.astype(np.float64)
    keep = np.isfinite(v)
    v = np.where(keep, v, 0.0)
    mean = np.zeros(n_keys)
    count = np.zeros(n_keys)
    for _ in range(n_iter):
        count = np.bincount(keys, keep, minlength=n_keys).astype(np.float64)
        safe = np.maximum(count, 1.0)
        mean = np.bincount(keys, np.where(keep, v, 0.0), minlength=n_keys) / safe
        dev = v - mean[keys]
        var = np.bincount(keys, np.where(keep, dev * dev, 0.0), minlength=n_keys) / safe
        new_keep = keep & (dev * dev <= clip * clip * var[keys])
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return mean, count


def cell_measurements(
    samples: Samples,
    *,
    grid_shape: tuple[int, int],
    cell_px: int = 8,
    min_fill: float = 0.8,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per (frame, coarse cell) sigma-clipped means of the samples (minus `reference`, one
    value per sample, when given; NaN references drop their samples).

    Returns (frame index, cell index, clipped mean, weight) for every (frame, cell) that the
    frame covers to at least `min_fill` of a full cell; weight = n / mean(unc^2), the inverse
    variance of the cell mean (up to a constant).
    """
    _ny, nx = grid_shape
    if samples.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), np.zeros(0)
    ncx = -(-nx // cell_px)
    cx = np.floor(samples.x + 0.5).astype(np.int64) // cell_px
    cy = np.floor(samples.y + 0.5).astype(np.int64) // cell_px
    # dense (frame, cell) keys without a sort: each frame's cells lie in a small box, and
    # `map_frames` keeps every frame's samples contiguous
    frame = samples.frame
    bounds = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1]])
    fx0 = np.minimum.reduceat(cx, bounds)
    fy0 = np.minimum.reduceat(cy, bounds)
    fw = np.maximum.reduceat(cx, bounds) - fx0 + 1
    fh = np.maximum.reduceat(cy, bounds) - fy0 + 1
    base = np.r_[0, np.cumsum(fw * fh)]
    run = np.repeat(np.arange(bounds.size), np.diff(np.r_[bounds, frame.size]))
    key = base[run] + (cy - fy0[run]) * fw[run] + (cx - fx0[run])
    n_keys = int(base[-1])
    values = samples.value if reference is None else samples.value - reference
    mean, counts = group_clipped_means(key, values, n_keys=n_keys)
    n_all = np.bincount(key, minlength=n_keys)
    var_sum = np.bincount(key, samples.unc.astype(np.float64) ** 2, minlength=n_keys)
    var_sum = var_sum * counts / np.maximum(n_all, 1)
    area = np.bincount(key, samples.area_px.astype(np.float64), minlength=n_keys)
    # a cell is "covered" when the frame's footprints fill most of it: partial cells would
    # compare different sky patches and bias the offsets on a sky gradient
    full = (area >= min_fill * cell_px * cell_px) & (counts > 0)
    weight = counts / np.maximum(var_sum / np.maximum(counts, 1), 1e-30)
    ukey = np.flatnonzero(full)
    r = np.searchsorted(base, ukey, side="right") - 1
    local = ukey - base[r]
    cell_of_key = (fy0[r] + local // fw[r]) * ncx + (fx0[r] + local % fw[r])
    frame_of_key = frame[bounds[r]]
    return frame_of_key, cell_of_key, mean[ukey], weight[ukey]


def solve_offsets(
    frame: np.ndarray,
    cell: np.ndarray,
    value: np.ndarray,
    weight: np.ndarray,
    *,
    n_frames: int,
    n_iter: int = 3,
    clip: float = 5.0,
) -> np.ndarray:
    """Offsets o_f (length `n_frames`, sum 0) minimising sum w_fc (m_fc - sky_c - o_f)^2.

    Frames that share no cell with another frame get offset 0. `clip` (in robust sigma of the
    normalised residuals) sets which measurements the reweighting passes drop.
    """
    offsets = np.zeros(n_frames)
    if frame.size == 0 or n_frames < 2:
        return offsets
    ucell, cidx = np.unique(cell, return_inverse=True)
    w = weight.astype(np.float64).copy()
    m = value.astype(np.float64)
    for _ in range(max(1, n_iter)):
        # a cell seen by a single frame constrains nothing
        n_in_cell = np.bincount(cidx, w > 0, minlength=ucell.size)
        wu = np.where(n_in_cell[cidx] >= 2, w, 0.0)
        mat = sp.csr_matrix((wu, (cidx, frame)), shape=(ucell.size, n_frames))
        wc = np.asarray(mat.sum(axis=1)).ravel()
        inv_wc = np.where(wc > 0, 1.0 / np.where(wc > 0, wc, 1.0), 0.0)
        diag = np.asarray(mat.sum(axis=0)).ravel()
        lap = sp.diags(diag) - mat.T @ sp.diags(inv_wc) @ mat
        sky_sum = np.bincount(cidx, wu * m, minlength=ucell.size)
        rhs = np.bincount(frame, wu * m, minlength=n_frames) - mat.T @ (sky_sum * inv_wc)
        connected = diag > 0
        if connected.sum() < 2:
            return offsets
        # the Laplacian is singular (a common constant is free): a tiny ridge picks the
        # zero-mean solution of each connected group of frames
        ridge = 1e-9 * float(diag[connected].mean())
        lap = (lap + sp.diags(np.where(connected, ridge, 1.0))).tocsr()
        precond = sp.diags(1.0 / lap.diagonal())
        sol, _info = cg(lap, rhs, rtol=1e-12, atol=0.0, maxiter=10 * n_frames + 100, M=precond)
        offsets = np.where(connected, sol, 0.0)
        offsets -= offsets[connected].mean()
        offsets[~connected] = 0.0
        sky = (sky_sum - np.bincount(cidx, wu * offsets[frame], minlength=ucell.size)) * inv_wc
        resid = (m - sky[cidx] - offsets[frame]) * np.sqrt(wu)
        active = wu > 0
        if not active.any():
            break
        scale = 1.4826 * float(np.median(np.abs(resid[active])))
        if scale <= 0:
            break
        w = np.where(np.abs(resid) <= clip * scale, weight, 0.0)
    return offsets


def pixel_median_reference(samples: Samples, *, grid_shape: tuple[int, int],
                           min_depth: int = 2) -> np.ndarray:
    """Per sample, the median of all samples whose footprint centre falls in the same output
    pixel (NaN where fewer than `min_depth` frames overlap there)."""
    _upix, med, counts, inverse = group_medians(samples.output_pixel(grid_shape), samples.value)
    return np.where(counts[inverse] >= min_depth, med[inverse], np.nan)


def match_backgrounds(
    samples: Samples,
    *,
    n_frames: int,
    grid_shape: tuple[int, int],
    cell_px: int = 8,
    min_fill: float = 0.8,
) -> np.ndarray:
    """Additive offset of each frame (input units, MJy/sr; sum 0) to subtract from it.

    Two passes: raw cell means first (robust to large offsets), then, on the corrected
    samples, cell means of each sample minus the median at its output pixel, which removes
    the sky's structure inside the cells from the measurements; the second pass's (small)
    corrections are added.
    """
    f, c, m, w = cell_measurements(samples, grid_shape=grid_shape, cell_px=cell_px,
                                   min_fill=min_fill)
    offsets = solve_offsets(f, c, m, w, n_frames=n_frames)
    corrected = samples.with_values((samples.value - offsets[samples.frame]).astype(np.float32))
    f, c, m, w = cell_measurements(
        corrected, grid_shape=grid_shape, cell_px=cell_px, min_fill=min_fill,
        reference=pixel_median_reference(corrected, grid_shape=grid_shape),
    )
    return offsets + solve_offsets(f, c, m, w, n_frames=n_frames)
