"""ISOCAM Derive_SPD pairing: CIER readouts -> CISP, one row per EOI/RESET pair (ADU/G/s)."""

from __future__ import annotations

import enum

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from shared.instruments import isocam as ic

VERSION = "SPD 1.0"
#: Two readouts are at the same pointing when they differ by less than this (arcsec).
SAME_POINTING_ARCSEC = 1.0


class Disc(enum.IntFlag):
    """CISPDISC bits: a row is usable only when CISPDISC = 0."""

    INCOMPLETE = 1  #: RESET or EOI missing (lost buffer): ARRAY is zero
    MOVING = 2  #: the pointing changed between RESET and EOI (raster slew)
    SETUP = 4  #: gain, integration time, lens or filter differ from the observation's


class PixStat(enum.IntFlag):
    """PIXSTAT bits per pixel of a CISP row (0 = good)."""

    DEAD = 1  #: LW column 24
    SATURATED = 2  #: RESET or EOI at the int16 full scale


def _sep_arcsec(ra1: NDArray, dec1: NDArray, ra2: NDArray, dec2: NDArray) -> NDArray:
    dra = (ra1 - ra2) * np.cos(np.radians(0.5 * (dec1 + dec2)))
    return np.hypot(dra, dec1 - dec2) * 3600.0


def derive_spd(cier: fits.HDUList) -> fits.HDUList:
    """CIER -> CISP: pair each RESET with the EOI one integration later; ARRAY = (EOI - RESET)
    / GAIN / TINT in ADU/G/s. Readouts without a partner give a row flagged INCOMPLETE.

    RASTPOS numbers the raster positions 1.. in time order (0 for rows not at a position).
    """
    h0 = cier[0].header
    c = {n: ic.column(cier, n) for n in ("GSCPTKEY", "UTK", "GAIN", "TINT", "TINTITK", "LENS",
                                          "RA", "DEC", "ROLL", "ARRAY")}
    kind = np.char.strip(np.asarray(cier[1].data["READOUT"]).astype(str))
    filt = np.char.strip(np.asarray(cier[1].data["FILTER"]).astype(str))
    n = kind.size
    itk = c["GSCPTKEY"].astype(np.int64)
    is_reset, is_eoi = kind == "RESET", kind == "EOI"
    paired = np.zeros(n, dtype=bool)
    if n > 1:
        paired[:-1] = is_reset[:-1] & is_eoi[1:] & (itk[1:] - itk[:-1] == c["TINTITK"][1:])
    r_idx = np.nonzero(paired)[0]
    e_idx = r_idx + 1
    used = np.zeros(n, dtype=bool)
    used[r_idx] = used[e_idx] = True
    orphan = np.nonzero(~used)[0]
    # Row i: a pair (reset index, eoi index) or an orphan readout (same index twice).
    rows_r = np.concatenate([r_idx, orphan])
    rows_e = np.concatenate([e_idx, orphan])
    order = np.argsort(itk[rows_r], kind="stable")
    rows_r, rows_e = rows_r[order], rows_e[order]
    is_pair = rows_r != rows_e
    gain = c["GAIN"][rows_e].astype(np.float64)
    tint = c["TINT"][rows_e].astype(np.float64)
    arr_r = c["ARRAY"][rows_r].astype(np.float64)
    arr_e = c["ARRAY"][rows_e].astype(np.float64)
    rate = np.where(is_pair[:, None], (arr_e - arr_r) / (gain * tint)[:, None], 0.0)
    sat = (c["ARRAY"][rows_r] >= ic.ADU_MAX) | (c["ARRAY"][rows_e] >= ic.ADU_MAX)
    pixstat = np.where(sat, int(PixStat.SATURATED), 0).astype(np.uint8)
    pixstat.reshape(-1, ic.NPIX_SIDE, ic.NPIX_SIDE)[:, :, ic.DEAD_COLUMN] |= int(PixStat.DEAD)
    rate.reshape(-1, ic.NPIX_SIDE, ic.NPIX_SIDE)[:, :, ic.DEAD_COLUMN] = 0.0

    disc = np.where(is_pair, 0, int(Disc.INCOMPLETE)).astype(np.int16)
    moving = _sep_arcsec(c["RA"][rows_r], c["DEC"][rows_r], c["RA"][rows_e],
                         c["DEC"][rows_e]) > SAME_POINTING_ARCSEC
    disc |= np.where(is_pair & moving, int(Disc.MOVING), 0).astype(np.int16)
    setup_ref = (h0.get("GAIN"), h0.get("TINT"), h0.get("LENS"), h0.get("FILTER"))
    if setup_ref[0] is not None:
        other = ((c["GAIN"][rows_e] != setup_ref[0]) | (np.abs(tint - setup_ref[1]) > 1e-3)
                 | (c["LENS"][rows_e] != setup_ref[2]) | (filt[rows_e] != setup_ref[3]))
        disc |= np.where(other, int(Disc.SETUP), 0).astype(np.int16)

    # Raster positions: a new position whenever a usable pair's pointing moves.
    good = disc == 0
    ra_e, dec_e = c["RA"][rows_e], c["DEC"][rows_e]
    rastpos = np.zeros(rows_r.size, dtype=np.int32)
    gi = np.nonzero(good)[0]
    if gi.size:
        jump = np.ones(gi.size, dtype=bool)
        jump[1:] = _sep_arcsec(ra_e[gi[1:]], dec_e[gi[1:]], ra_e[gi[:-1]],
                               dec_e[gi[:-1]]) > SAME_POINTING_ARCSEC
        rastpos[gi] = np.cumsum(jump)

    h = ic.carry(h0, root="CISP")
    h["NPAIRS"] = (int(is_pair.sum()), "complete EOI/RESET pairs")
    h["NORPHAN"] = (int((~is_pair).sum()), "readouts without a partner (INCOMPLETE rows)")
    h["NRASTPOS"] = (int(rastpos.max()) if rastpos.size else 0, "raster positions")
    h["DERIVSPD"] = (VERSION, "version of Derive_SPD")
    h.add_comment("CISPDISC bits: 1 incomplete pair, 2 pointing moved, 4 set-up differs")
    h.add_comment("PIXSTAT bits: 1 dead pixel, 2 saturated readout")
    cols = [
        fits.Column("GSCPTKEY", "J", unit="ITK", array=itk[rows_r]),
        fits.Column("ITKEOI", "J", unit="ITK", array=itk[rows_e]),
        fits.Column("UTK", "D", unit="1/24 s", array=0.5 * (c["UTK"][rows_r] + c["UTK"][rows_e])),
        fits.Column("TINT", "E", unit="s", array=tint),
        fits.Column("GAIN", "I", array=c["GAIN"][rows_e].astype(np.int16)),
        fits.Column("LENS", "E", unit="arcsec", array=c["LENS"][rows_e]),
        fits.Column("FILTER", "6A", array=filt[rows_e]),
        fits.Column("RA", "D", unit="deg", array=ra_e),
        fits.Column("DEC", "D", unit="deg", array=dec_e),
        fits.Column("ROLL", "E", unit="deg", array=c["ROLL"][rows_e]),
        fits.Column("RASTPOS", "J", array=rastpos),
        fits.Column("CISPDISC", "I", array=disc),
        fits.Column("NSATPIX", "I", array=sat.sum(axis=1).astype(np.int16)),
        fits.Column("PIXSTAT", f"{ic.NPIX}B", array=pixstat),
        fits.Column("ARRAY", f"{ic.NPIX}E", unit="adu/s", array=rate.astype(np.float32)),
    ]
    return ic.table_product(h, cols, root="CISP", table_header={
        "ARRUNIT": ("ADU/G/s", "ARRAY unit: ADU per unit gain per second")})
