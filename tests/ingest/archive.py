"""Small Spitzer-archive-style MIPS files (BCD, bunc, masks, fbcd) as FITS bytes, for the
ingest tests of archive submissions."""

from __future__ import annotations

import io
import math

import numpy as np
from astropy.io import fits

AORKEY = 17543424
#: channel -> (array shape, pixel scale in arcsec, status-mask product type)
BANDS = {1: ((16, 16), 2.49, "bbmsk"), 2: ((8, 8), 9.85, "bmask")}


def header(ch: int = 1, *, dcenum: int = 0, expid: int = 0, kind: str = "bcd") -> fits.Header:
    """A MIPS BCD-level primary header with a TAN celestial WCS (CD matrix)."""
    (ny, nx), pix, _ = BANDS[ch]
    s = pix / 3600.0
    h = fits.Header()
    h["TELESCOP"] = "Spitzer"
    h["INSTRUME"] = "MIPS"
    h["CHNLNUM"] = ch
    h["AORKEY"] = AORKEY
    h["EXPID"] = expid
    h["DCENUM"] = dcenum
    h["EXPTIME"] = 9.96
    if kind not in ("bbmsk", "bmask"):
        h["BUNIT"] = "MJy/sr"
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CRPIX1"] = (nx + 1) / 2
    h["CRPIX2"] = (ny + 1) / 2
    h["CRVAL1"] = 150.1163 + dcenum * 5e-4
    h["CRVAL2"] = 2.2058
    h["CD1_1"] = -s * math.cos(0.3)
    h["CD1_2"] = s * math.sin(0.3)
    h["CD2_1"] = s * math.sin(0.3)
    h["CD2_2"] = s * math.cos(0.3)
    return h


def spitzer_name(ch: int, dcenum: int, kind: str, ext: str = ".fits", expid: int = 0) -> str:
    return f"SPITZER_M{ch}_{AORKEY}_{expid:04d}_{dcenum:04d}_2_{kind}{ext}"


def product(
    ch: int = 1,
    *,
    dcenum: int = 0,
    kind: str = "bcd",
    filename: str | None = None,
    hdr: fits.Header | None = None,
) -> bytes:
    """FITS bytes of one per-DCE product; masks are uint16 images, the others float32.
    `filename` sets the FILENAME keyword (archive headers carry it)."""
    (ny, nx), _, _ = BANDS[ch]
    h = hdr if hdr is not None else header(ch, dcenum=dcenum, kind=kind)
    if filename is not None:
        h["FILENAME"] = filename
    rng = np.random.default_rng(dcenum)
    if kind in ("bbmsk", "bmask"):
        data: np.ndarray = np.zeros((ny, nx), np.uint16)
    else:
        data = (25 + rng.normal(0, 0.1, (ny, nx))).astype(np.float32)
    buf = io.BytesIO()
    fits.PrimaryHDU(data, header=h).writeto(buf)
    return buf.getvalue()


def triplet(ch: int, dcenum: int, *, ext: str = ".fits") -> dict[str, bytes]:
    """name -> bytes of one DCE's bcd, bunc and status mask, with Spitzer names."""
    mask = BANDS[ch][2]
    return {
        spitzer_name(ch, dcenum, kind, ext): product(
            ch, dcenum=dcenum, kind=kind, filename=spitzer_name(ch, dcenum, kind)
        )
        for kind in ("bcd", "bunc", mask)
    }


def headers_of(files: dict[str, bytes]) -> list[tuple[str, fits.Header | None]]:
    """(name, primary header) pairs, as ingest hands them to the grouping."""
    out: list[tuple[str, fits.Header | None]] = []
    for name, data in sorted(files.items()):
        with fits.open(io.BytesIO(data)) as hdul:
            out.append((name, hdul[0].header.copy()))
    return out
