"""FITS in and out of the store: bytes <-> HDUList, checksums, provenance records."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.table import Table
from astropy.wcs import WCS

from shared import fitscheck
from shared.messages import utcnow

CREATOR = "skybus 0.1.0"


def to_bytes(hdul: fits.HDUList) -> bytes:
    """Serialise with CHECKSUM/DATASUM cards (astropy and fitsverify check them)."""
    buf = io.BytesIO()
    hdul.writeto(buf, checksum=True, output_verify="exception")
    return buf.getvalue()


def open_bytes(data: bytes) -> fits.HDUList:
    """Open FITS bytes fully in memory; raises ValueError with a readable reason if corrupt.

    The file's structure is checked first (`fitscheck`): astropy pads a truncated data unit
    with zeros, or drops a truncated extension, and only warns."""
    fitscheck.check_fits(data, all_values=False)
    try:
        hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
        for hdu in hdul:
            _ = hdu.data  # force reading now, so a bad data unit shows here and not later
    except (OSError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"not a readable FITS file ({exc}); check the file is complete") from exc
    if len(hdul) == 0:
        raise ValueError("FITS file has no HDU")
    return hdul


#: Keywords that describe an HDU's structure, not the observation.
_STRUCTURE = re.compile(r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|EXTNAME|"
                        r"EXTVER|CHECKSUM|DATASUM|BSCALE|BZERO|BLANK)$")


def _image_index(hdul: fits.HDUList) -> int:
    """The HDU holding the file's image: the primary one when it has an image (NAXIS >= 2),
    else the first image extension (tile-compressed ones included), else the primary."""
    for i, hdu in enumerate(hdul):
        if i and not isinstance(hdu, fits.ImageHDU | fits.CompImageHDU):
            continue
        if int(hdu.header.get("NAXIS", 0) or 0) >= 2:
            return i
    return 0


def image_header(hdul: fits.HDUList) -> fits.Header:
    """The header of the file's image (see `image_hdu`), without reading any data."""
    return image_hdu(hdul, with_data=False)[1]


def image_hdu(hdul: fits.HDUList, *, with_data: bool = True
              ) -> tuple[np.ndarray | None, fits.Header]:
    """(data, header) of the file's image: the primary HDU's, or for a file written with an
    empty primary (or tile-compressed, `.fits.fz`) the first image extension's, whose header
    is then completed with the primary's observation keywords (TELESCOP, AORKEY ...: the
    extension's own values win). Trailing axes of length 1 (NAXIS3 = 1) are dropped, from
    the data and the header. `data` is None with `with_data=False`."""
    i = _image_index(hdul)
    hdu = hdul[i]
    header = hdu.header.copy()
    data = hdu.data if with_data else None
    # Degenerate axes (NAXIS3 = 1, as some tools write a single plane): a 2-D image.
    naxis = int(header.get("NAXIS", 0) or 0)
    while naxis > 2 and int(header.get(f"NAXIS{naxis}", 0) or 0) == 1:
        del header[f"NAXIS{naxis}"]
        naxis -= 1
        header["NAXIS"] = naxis
        if data is not None:
            data = data[0]
    if i:
        for card in hdul[0].header.cards:
            key = card.keyword
            skip = key in ("COMMENT", "HISTORY", "") or bool(_STRUCTURE.match(key))
            if not skip and key not in header:
                header[key] = (card.value, card.comment)
    return data, header


def add_provenance(
    header: fits.Header, *, step: str, parents: Iterable[str], creator: str = CREATOR
) -> None:
    """Record who made the product, when, and from which inputs (HISTORY, one line each)."""
    header["CREATOR"] = (creator, "software that wrote this file")
    header["DATE"] = (utcnow()[:19], "UTC time the file was written")
    header.add_history(f"{creator} {step} {utcnow()[:19]}")
    for key in parents:
        header.add_history(f"input: {key}")


def read_bintable(
    data: bytes, *, required: Sequence[str], what: str, error: type[ValueError] = ValueError
) -> Table:
    """The first BINTABLE of FITS bytes as a Table; `error` (naming `what`) if the bytes are
    not FITS, hold no table, or the table lacks a `required` column."""
    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise error(f"{what} has no BINTABLE extension")
            table = Table(hdu.data)
    except OSError as exc:
        raise error(f"{what} is not a readable FITS file: {exc}") from exc
    missing = [c for c in required if c not in table.colnames]
    if missing:
        raise error(f"{what} lacks columns {missing}; expected {tuple(required)}")
    return table


#: The keywords a celestial (TAN-SIP, TPV, ...) WCS is built from.
_WCS_KEYWORD = re.compile(
    r"^(NAXIS\d*|WCSAXES|CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CUNIT\d|CD\d_\d|PC\d_\d|CROTA\d"
    r"|PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|EQUINOX|EPOCH|(A|B|AP|BP)_\w+|MJD-OBS"
    r"|DATE-OBS|MJDREF\w*)$"
)


def wcs_cards(header: fits.Header) -> fits.Header:
    """Only the WCS keywords of `header` (primary WCS, SIP and PV distortions): astropy's WCS
    parses these ~10-20x faster than a whole Spitzer header of hundreds of cards."""
    return fits.Header([c for c in header.cards if _WCS_KEYWORD.match(c.keyword)])


#: (longitude, latitude) prefixes of celestial CTYPEs: equatorial, galactic, ecliptic, ...
_CELESTIAL_PAIRS = (("RA--", "DEC-"), ("GLON", "GLAT"), ("ELON", "ELAT"), ("SLON", "SLAT"))


def _number(header: fits.Header, key: str) -> float | None:
    """A finite numeric keyword, else None (missing, text, NaN, unparsable)."""
    try:
        value = header.get(key)
    except (VerifyError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def celestial_wcs_problem(header: fits.Header) -> str | None:
    """Why `header` has no usable celestial WCS, or None when it has one.

    Usable: CTYPE1/2 a longitude/latitude pair (RA/DEC, GLON/GLAT ...), numeric CRPIX1/2 and
    CRVAL1/2 (latitude within +-90 deg), and a non-singular CD matrix or non-zero CDELT1/2;
    astropy must then build a celestial WCS from these cards.
    """
    ctype = [str(header.get(f"CTYPE{k}", "")).strip().upper() for k in (1, 2)]
    if not all(ctype):
        missing = [f"CTYPE{k}" for k, c in zip((1, 2), ctype, strict=True) if not c]
        return f"no {', '.join(missing)} in the header"
    if (ctype[0][:4], ctype[1][:4]) not in _CELESTIAL_PAIRS:
        return f"CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r} are not a celestial longitude/latitude pair"
    for key in ("CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2"):
        if _number(header, key) is None:
            return f"no numeric {key} in the header"
    lat = _number(header, "CRVAL2")
    if lat is not None and abs(lat) > 90:
        return f"CRVAL2 = {lat} is not a latitude (|CRVAL2| <= 90 deg)"
    cd_keys = ("CD1_1", "CD1_2", "CD2_1", "CD2_2")
    if any(k in header for k in cd_keys):
        for key in cd_keys:
            if key in header and _number(header, key) is None:
                return f"{key} is not a finite number"
        a, b, c, d = (_number(header, k) or 0.0 for k in cd_keys)  # absent elements are 0
        if a * d - b * c == 0:
            return "the CD matrix is singular (no pixel scale)"
    else:
        scales = [_number(header, k) for k in ("CDELT1", "CDELT2")]
        if not all(scales):
            return "no pixel scale: neither a CD matrix nor non-zero CDELT1/CDELT2"
    try:
        wcs = WCS(wcs_cards(header), relax=True, naxis=2)
    except Exception as exc:  # wcslib reports a bad WCS through many exception types
        return f"astropy cannot build the WCS ({exc})"
    if not wcs.has_celestial:
        return "astropy finds no celestial axes in the WCS"
    return None
