"""TAUVEX band merge: one source list across the T1-T3 filters, with upper limits.

Detections of all filters are grouped by position (friends-of-friends within
`match_radius_arcsec`); the merged position is the S/N^2-weighted mean. Every filter is then
measured by forced aperture photometry at the merged position on its own image (with its
exposure map); where a filter has no detection in the group, ULIM_UJY_<filter> gives the upper
limit max(forced flux, 0) + `ulim_sigma` x error (NaN where the filter detected the source).
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from services.extract.tauvex.photometry import _units, forced_photometry
from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["EXT_PS"]


def band_merge(
    images: dict[str, fits.HDUList], lists: dict[str, Table], *,
    match_radius_arcsec: float = 6.0, ulim_sigma: float = 3.0, aperture_fwhm: float = 2.0,
) -> Table:
    """Band-merged list. `images`/`lists`: Level 2 image and source list per filter name.

    Columns: ID, RA, DEC, NBANDS, then per filter F: FLUX_UJY_F, FLUX_ERR_UJY_F, SNR_F,
    DET_F (1 detected, 0 not), ULIM_UJY_F (upper limit where not detected), FLAGS_F.
    """
    filters = list(images)
    ra_all, dec_all, band_all, snr_all = [], [], [], []
    for i, f in enumerate(filters):
        t = lists.get(f, Table())
        if len(t):
            ra_all.append(np.asarray(t["RA"], dtype=np.float64))
            dec_all.append(np.asarray(t["DEC"], dtype=np.float64))
            band_all.append(np.full(len(t), i))
            snr_all.append(np.nan_to_num(np.asarray(t["SNR"], dtype=np.float64), nan=1.0))
    out = Table()
    if not ra_all:
        ra, dec, group, ngroups, band, snr = (np.zeros(0),) * 2 + (np.zeros(0, int), 0) + (
            np.zeros(0, int), np.zeros(0))
    else:
        ra, dec = np.concatenate(ra_all), np.concatenate(dec_all)
        band, snr = np.concatenate(band_all), np.concatenate(snr_all)
        vec = np.stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                        np.cos(np.radians(dec)) * np.sin(np.radians(ra)),
                        np.sin(np.radians(dec))], axis=1)
        pairs = cKDTree(vec).query_pairs(np.radians(match_radius_arcsec / 3600.0),
                                         output_type="ndarray")
        n = ra.size
        adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        ngroups, group = connected_components(adj, directed=False)
    w = np.maximum(snr, 1.0) ** 2
    if ngroups:
        sw = np.bincount(group, w, minlength=ngroups)
        v = [np.bincount(group, w * c, minlength=ngroups) / sw for c in (
            np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
            np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec)))]
        mra = np.degrees(np.arctan2(v[1], v[0])) % 360.0
        mdec = np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))
    else:
        mra, mdec = np.zeros(0), np.zeros(0)
    out["ID"] = np.arange(1, ngroups + 1, dtype=np.int32)
    out["RA"], out["DEC"] = mra, mdec
    nb = np.zeros(ngroups, dtype=np.int16)
    for i, f in enumerate(filters):
        det = np.zeros(ngroups, dtype=bool)
        det[group[band == i]] = True
        nb += det
        ph = forced_photometry(images[f], mra, mdec, aperture_fwhm=aperture_fwhm)
        fl = np.asarray(ph["FLUX_UJY"], dtype=np.float64)
        er = np.asarray(ph["FLUX_ERR_UJY"], dtype=np.float64)
        out[f"FLUX_UJY_{f}"] = fl
        out[f"FLUX_ERR_UJY_{f}"] = er
        out[f"SNR_{f}"] = np.asarray(ph["SNR"], dtype=np.float64)
        out[f"DET_{f}"] = det.astype(np.int16)
        out[f"ULIM_UJY_{f}"] = np.where(det, np.nan, np.maximum(fl, 0.0) + ulim_sigma * er)
        out[f"FLAGS_{f}"] = np.asarray(ph["FLAGS"], dtype=np.int16)
    out.add_column(nb, name="NBANDS", index=3)
    out.meta.update({"TELESCOP": tv.TELESCOP, "EXT_PS": VERSION, "FILTERS": ",".join(filters),
                     "MATCHRAD": match_radius_arcsec, "ULIMSIG": ulim_sigma})
    _units(out)
    return out
