"""TAUVEX REGISTER module (Level 1g): refine event RA/Dec by registering time slices on sources.

The attitude reported by the spacecraft carries a slowly varying error. The events are cut into
short time slices; in each slice the events that fall near a reference source are matched to
it and the mean offset (east, north) of the slice is measured, iteratively with shrinking match
radii; offsets are interpolated in time to every event and removed. The reference is either an
external catalogue (absolute registration: removes constant and varying errors) or, without one,
the bright-source centroids of the observation itself (relative: removes only the varying part).
Roll errors are not fitted (a small rotation of a 0.9 deg field; not simulated).
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from services.calibrate.tauvex.calc_ra import _unit, galactic
from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["REGISTER"]
ARCSEC_PER_RAD = np.degrees(1.0) * 3600.0


def self_reference(
    ra_deg: NDArray[np.float64], dec_deg: NDArray[np.float64], *, bin_arcsec: float = 3.0,
    min_counts: float = 150.0, fwhm_arcsec: float = tv.PSF_FWHM_ARCSEC,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Bright-source positions (deg) found in the events themselves (peaks of a counts map)."""
    if ra_deg.size == 0:
        return np.zeros(0), np.zeros(0)
    dec_c = float(np.median(dec_deg))
    ra_c = float(np.degrees(np.arctan2(np.median(np.sin(np.radians(ra_deg))),
                                       np.median(np.cos(np.radians(ra_deg))))) % 360.0)
    e = ((ra_deg - ra_c + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec_c)) * 3600.0
    n = (dec_deg - dec_c) * 3600.0
    e0, n0 = e.min(), n.min()
    ix = ((e - e0) / bin_arcsec).astype(np.int64)
    iy = ((n - n0) / bin_arcsec).astype(np.int64)
    img = np.zeros((iy.max() + 1, ix.max() + 1))
    np.add.at(img, (iy, ix), 1.0)
    sigma = fwhm_arcsec / 2.3548 / bin_arcsec
    # Counts within the PSF: smoothed map x (2 pi sigma^2) ~ counts of a point source.
    sm = ndimage.gaussian_filter(img, sigma) * 2 * np.pi * sigma**2
    peaks = (sm == ndimage.maximum_filter(sm, size=5)) & (sm >= min_counts / 2)
    py, px = np.nonzero(peaks)
    pe = e0 + (px + 0.5) * bin_arcsec
    pn = n0 + (py + 0.5) * bin_arcsec
    return ra_c + pe / 3600.0 / np.cos(np.radians(dec_c)), dec_c + pn / 3600.0


def slice_offsets(
    time_s: NDArray[np.float64], ra_deg: NDArray[np.float64], dec_deg: NDArray[np.float64],
    ref_ra_deg: NDArray[np.float64], ref_dec_deg: NDArray[np.float64], *, slice_s: float,
    radii_arcsec: tuple[float, ...], min_matches: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], int]:
    """Per-slice offsets of the events from the reference: (centres_s, east, north arcsec, n)."""
    t0 = float(time_s.min())
    sl = np.floor((time_s - t0) / slice_s).astype(np.int64)
    nsl = int(sl.max()) + 1
    centres = np.asarray(t0 + (np.arange(nsl) + 0.5) * slice_s, dtype=np.float64)
    off_e = np.zeros(nsl)
    off_n = np.zeros(nsl)
    tree = cKDTree(_unit(ref_ra_deg, ref_dec_deg).T)
    cosd = np.cos(np.radians(dec_deg))
    n_match = 0
    for radius in radii_arcsec:
        # Current corrected positions of the events.
        ra_c = ra_deg - off_e[sl] / 3600.0 / cosd
        dec_c = dec_deg - off_n[sl] / 3600.0
        dist, idx = tree.query(_unit(ra_c, dec_c).T, distance_upper_bound=radius / ARCSEC_PER_RAD)
        m = np.isfinite(dist)
        n_match = int(m.sum())
        de = ((ra_c[m] - ref_ra_deg[idx[m]] + 180.0) % 360.0 - 180.0) * cosd[m] * 3600.0
        dn = (dec_c[m] - ref_dec_deg[idx[m]]) * 3600.0
        cnt = np.bincount(sl[m], minlength=nsl)
        good = cnt >= min_matches
        if not good.any():
            break
        res_e = np.bincount(sl[m], de, minlength=nsl)[good] / cnt[good]
        res_n = np.bincount(sl[m], dn, minlength=nsl)[good] / cnt[good]
        # Slices with too few matches take the time-interpolated residual of their neighbours.
        off_e += np.interp(centres, centres[good], res_e)
        off_n += np.interp(centres, centres[good], res_n)
    return centres, off_e, off_n, n_match


def register(
    level1f: fits.HDUList, *, reference_ra_deg: NDArray[np.floating] | None = None,
    reference_dec_deg: NDArray[np.floating] | None = None, slice_s: float = 4.0,
    radii_arcsec: tuple[float, ...] = (30.0, 18.0, 10.0, 10.0), min_matches: int = 30,
) -> fits.HDUList:
    """Level 1f -> 1g: RA, DEC, GLON, GLAT registered on a reference (see module docstring).

    `reference_ra_deg/dec_deg`: reference catalogue positions (deg, ICRS), e.g. bright UV
    sources; None = self-registration on the observation's own bright sources. `slice_s`:
    time-slice length (s); `radii_arcsec`: successive match radii; `min_matches`: events needed
    to measure a slice's offset.
    """
    cols, header = tv.event_columns(level1f)
    use = (cols["VALIDITY"] == 0) & np.isfinite(cols["RA"])
    if reference_ra_deg is None or reference_dec_deg is None:
        ref_ra, ref_dec = self_reference(cols["RA"][use], cols["DEC"][use])
        mode = "self"
    else:
        ref_ra = np.asarray(reference_ra_deg, dtype=np.float64)
        ref_dec = np.asarray(reference_dec_deg, dtype=np.float64)
        mode = "catalog"
    h = tv.product_header(header)
    h["REGISTER"] = (VERSION, "version of module REGISTER")
    h["REGREF"] = (mode, "registration reference: catalog or self")
    if use.sum() < min_matches or ref_ra.size == 0:
        h["REGSTAT"] = ("SKIPPED", "too few events or reference sources")
        return tv.event_table("1g", cols, h)
    centres, off_e, off_n, n_match = slice_offsets(
        cols["TIME"][use], cols["RA"][use], cols["DEC"][use], ref_ra, ref_dec,
        slice_s=slice_s, radii_arcsec=radii_arcsec, min_matches=min_matches)
    fin = np.isfinite(cols["RA"])
    ev_e = np.interp(cols["TIME"], centres, off_e)
    ev_n = np.interp(cols["TIME"], centres, off_n)
    dec = np.where(fin, cols["DEC"] - ev_n / 3600.0, np.nan)
    ra = np.where(fin, (cols["RA"] - ev_e / 3600.0 / np.cos(np.radians(cols["DEC"]))) % 360.0,
                  np.nan)
    cols["RA"], cols["DEC"] = ra, dec
    cols["GLON"], cols["GLAT"] = galactic(ra, dec)
    h["REGSTAT"] = ("COMPLETE", "registration applied")
    h["REGNSRC"] = (int(ref_ra.size), "reference sources")
    h["REGNMAT"] = (n_match, "events matched in the last iteration")
    h["REGSLICE"] = (slice_s, "[s] time-slice length")
    h["REGMEANE"] = (round(float(off_e.mean()), 3), "[arcsec] mean east offset removed")
    h["REGMEANN"] = (round(float(off_n.mean()), 3), "[arcsec] mean north offset removed")
    h["REGRMS"] = (round(float(np.hypot(off_e - off_e.mean(), off_n - off_n.mean()).std()), 3),
                   "[arcsec] rms of time-varying offsets")
    return tv.event_table("1g", cols, h)
