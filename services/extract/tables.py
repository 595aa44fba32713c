"""Source-list serialisation: IPAC tables (as Spitzer tools write them) and FITS BINTABLEs."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np
from astropy.io import ascii as astropy_ascii
from astropy.io import fits
from astropy.table import MaskedColumn, Table

HeaderCards = (
    Mapping[str, object] | Iterable[fits.Card | tuple[str, object] | tuple[str, object, str]]
)


class TableFormatError(ValueError):
    """Bytes that are not a readable IPAC/FITS source table."""


def _scalar_meta(table: Table) -> dict[str, object]:
    """Meta items that fit a FITS/IPAC keyword (scalars), keys upper-cased."""
    out: dict[str, object] = {}
    for key, val in table.meta.items():
        if isinstance(val, bool | int | float | str | np.integer | np.floating):
            out[str(key).upper()] = val.item() if isinstance(val, np.generic) else val
    return out


def _for_ipac(table: Table) -> Table:
    """Copy with NaNs masked (IPAC writes them as 'null') and the meta as keywords."""
    t = Table(table, copy=True, masked=False)
    t.meta = {}
    for name in t.colnames:
        col = t[name]
        if col.dtype.kind == "f":
            bad = ~np.isfinite(np.asarray(col))
            if np.any(bad):
                t[name] = MaskedColumn(np.asarray(col), mask=bad, unit=col.unit,
                                       description=col.description)
    t.meta["keywords"] = {k: {"value": v} for k, v in _scalar_meta(table).items()}
    return t


def to_ipac_bytes(table: Table) -> bytes:
    """The table as an IPAC ASCII table (UTF-8/ASCII bytes): the format of APEX and bandmerge
    `.tbl` files. Scalar meta become `\\KEY = value` keywords; NaN is written as null."""
    buf = io.StringIO()
    astropy_ascii.write(_for_ipac(table), buf, format="ipac", overwrite=True)
    return buf.getvalue().encode("ascii", errors="replace")


def from_ipac_bytes(data: bytes) -> Table:
    """Read an IPAC table written by `to_ipac_bytes` (or APEX); nulls come back as NaN."""
    try:
        t = astropy_ascii.read(data.decode("ascii", errors="replace"), format="ipac")
    except Exception as exc:  # astropy raises several types for malformed text
        raise TableFormatError(f"not a readable IPAC table: {exc}") from exc
    return _unmask(t)


def _unmask(t: Table) -> Table:
    out = Table(meta={})
    for name in t.colnames:
        col = t[name]
        if isinstance(col, MaskedColumn) and col.dtype.kind == "f":
            out[name] = np.asarray(col.filled(np.nan))
        elif isinstance(col, MaskedColumn):
            out[name] = np.asarray(col.filled())
        else:
            out[name] = np.asarray(col)
        out[name].unit = col.unit
    kw = t.meta.get("keywords", {})
    for key, val in kw.items():
        out.meta[key] = val.get("value") if isinstance(val, Mapping) else val
    for key, val in t.meta.items():
        if key not in ("keywords", "comments"):
            out.meta[key] = val
    return out


def to_fits_hdulist(table: Table, header_cards: HeaderCards | None = None) -> fits.HDUList:
    """An empty primary HDU (with `header_cards`) + one BINTABLE of `table` with TUNITn.

    `header_cards`: mapping keyword -> value, or cards / (keyword, value[, comment]) tuples; they
    go in the primary header (the mission keywords of the product). Scalar meta of the table go
    in the BINTABLE header. The result passes `fitsverify`.
    """
    primary = fits.PrimaryHDU()
    if header_cards is not None:
        items: Iterable[object] = (
            header_cards.items() if isinstance(header_cards, Mapping) else header_cards
        )
        for item in items:
            if isinstance(item, fits.Card):
                primary.header.append(item)
            else:
                primary.header.append(tuple(item))  # type: ignore[arg-type]
    t = Table(table, copy=True)
    t.meta = {}
    hdu = fits.table_to_hdu(t)
    for key, val in _scalar_meta(table).items():
        if len(key) <= 8:
            hdu.header[key] = val
        else:
            hdu.header[f"HIERARCH {key}"] = val
    if any(isinstance(v, str) and len(v) > 68 for v in hdu.header.values()):
        # astropy continues long strings over CONTINUE cards: the OGIP convention, which
        # the header must then declare
        hdu.header["LONGSTRN"] = ("OGIP 1.0", "long strings continue over CONTINUE cards")
    hdu.header["EXTNAME"] = "SOURCES"
    hdul = fits.HDUList([primary, hdu])
    hdul.verify("exception")
    return hdul


def from_fits_hdulist(hdul: fits.HDUList) -> Table:
    """The source table of a file written by `to_fits_hdulist` (first BINTABLE)."""
    for hdu in hdul:
        if isinstance(hdu, fits.BinTableHDU):
            t = Table.read(hdu, mask_invalid=False)
            return _unmask(t)
    raise TableFormatError("no BINTABLE extension in this FITS file")


def to_fits_bytes(table: Table, header_cards: HeaderCards | None = None) -> bytes:
    """`to_fits_hdulist` serialised to FITS file bytes."""
    buf = io.BytesIO()
    to_fits_hdulist(table, header_cards).writeto(buf)
    return buf.getvalue()


def from_fits_bytes(data: bytes) -> Table:
    """Read the source table of FITS file bytes (as written by `to_fits_bytes`)."""
    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            return from_fits_hdulist(hdul)
    except OSError as exc:
        raise TableFormatError(f"not a readable FITS file: {exc}") from exc
