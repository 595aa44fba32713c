"""TAUVEX CALC_RA module (Level 1f): sky coordinates of each event from the spacecraft attitude."""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["CALC_RA"]


def _icrs_to_galactic_matrix() -> NDArray[np.float64]:
    """Rotation matrix ICRS -> Galactic, taken once from astropy (so both agree exactly)."""
    from astropy.coordinates import Galactic, SkyCoord

    basis = SkyCoord(x=[1.0, 0.0, 0.0], y=[0.0, 1.0, 0.0], z=[0.0, 0.0, 1.0],
                     representation_type="cartesian", frame="icrs")
    g = basis.transform_to(Galactic()).cartesian
    return np.stack([g.x.value, g.y.value, g.z.value])


_ICRS_TO_GAL = _icrs_to_galactic_matrix()


class AttitudeCoverageError(ValueError):
    """The attitude table does not cover the events (wrong observation or telemetry gap)."""


def _unit(ra_deg: NDArray, dec_deg: NDArray) -> NDArray[np.float64]:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _radec(v: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    ra = np.degrees(np.arctan2(v[1], v[0])) % 360.0
    dec = np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))
    return ra, dec


def galactic(ra_deg: NDArray, dec_deg: NDArray) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ICRS RA, Dec (deg) -> Galactic l, b (deg), one matrix product (agrees with astropy)."""
    return _radec(_ICRS_TO_GAL @ _unit(ra_deg, dec_deg))


def boresight_at(
    attitude: Table, tele: int, time_s: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Boresight RA, Dec, roll (deg) of telescope `tele` at spacecraft clock `time_s` (s).

    Linear interpolation of the unit vector (safe across RA = 0) and of the unwrapped roll.
    The last array is False where `time_s` lies outside the attitude table.
    """
    t_att = np.asarray(attitude["TIME"], dtype=np.float64)
    v = _unit(np.asarray(attitude[f"RA_T{tele}"]), np.asarray(attitude[f"DEC_T{tele}"]))
    vi = np.stack([np.interp(time_s, t_att, c) for c in v])
    ra, dec = _radec(vi / np.linalg.norm(vi, axis=0))
    roll = np.interp(time_s, t_att, np.degrees(np.unwrap(np.radians(
        np.asarray(attitude[f"ROLL_T{tele}"], dtype=np.float64)))))
    covered = (time_s >= t_att[0]) & (time_s <= t_att[-1]) if t_att.size else np.zeros(
        np.shape(time_s), dtype=bool)
    return ra, dec, roll, covered


def calc_ra(level1e: fits.HDUList, attitude: Table) -> fits.HDUList:
    """Level 1e -> 1f: RA, DEC (ICRS, deg) and GLON, GLAT (deg) of every event.

    `attitude` is the Level 1 attitude table (TIME in s of spacecraft clock; RA_Tk, DEC_Tk,
    ROLL_Tk in deg). Events outside its time range get NaN and ValidityBit.NO_ATTITUDE; if no
    event is covered, `AttitudeCoverageError` is raised.
    """
    cols, header = tv.event_columns(level1e)
    tele = int(header["TELE_NUM"])
    if len(attitude) < 2:
        raise AttitudeCoverageError("attitude table has fewer than 2 rows: cannot interpolate")
    ra0, dec0, roll, covered = boresight_at(attitude, tele, cols["TIME"])
    if cols["TIME"].size and not covered.any():
        raise AttitudeCoverageError(
            f"attitude TIME {attitude['TIME'][0]:.1f}..{attitude['TIME'][-1]:.1f} s does not "
            f"cover the events ({cols['TIME'].min():.1f}..{cols['TIME'].max():.1f} s)")
    ra, dec = tv.focal_to_sky(cols["GEOCORRX"], cols["GEOCORRY"], ra0, dec0, roll)
    ra, dec = np.where(covered, ra, np.nan), np.where(covered, dec, np.nan)
    glon, glat = galactic(ra, dec)
    cols["VALIDITY"] = cols["VALIDITY"] | np.where(
        covered, 0, int(tv.ValidityBit.NO_ATTITUDE)).astype(np.int32)
    cols["CALIB"] = np.where(covered, cols["CALIB"], 0.0).astype(np.float32)
    cols["RA"], cols["DEC"], cols["GLON"], cols["GLAT"] = ra, dec, glon, glat
    h = tv.product_header(header)
    h["CALC_RA"] = (VERSION, "version of module CALC_RA")
    h["RADESYS"] = ("ICRS", "frame of RA, DEC")
    return tv.event_table("1f", cols, h)
