"""Whether a submitted FITS file can be trusted: complete, with readable headers (a BCD's
celestial WCS is checked by `shared.fitsio.celestial_wcs_problem`). Checked at ingest, so a
bad file is stopped with its name and reason instead of failing a whole AOR downstream.

Pure functions on bytes and headers; the FITS rules are those of the FITS standard 4.0
(2880-byte blocks, 80-character ASCII cards, data size from BITPIX, NAXISn, PCOUNT, GCOUNT).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

BLOCK_BYTES = 2880
CARD_BYTES = 80
#: Keywords made of letters, digits, hyphen and underscore (FITS 4.0 sect. 4.1.2.1 wants upper
#: case; lower case, which some writers produce and astropy reads, is tolerated).
_KEYWORD = re.compile(r"[A-Za-z0-9_-]{0,8}")
#: Cards whose text after column 8 is free text, not a value.
_COMMENTARY = frozenset({"", "COMMENT", "HISTORY", "CONTINUE"})


class CorruptFitsError(ValueError):
    """The bytes are not a whole, readable FITS file (truncated, or a corrupt header)."""


@dataclass(frozen=True, slots=True)
class HduLayout:
    """Where one HDU lies in the file, as its header says."""

    index: int
    header_start: int  #: byte offset of the header
    data_start: int  #: byte offset of the data (after the header's last block)
    data_bytes: int  #: data size the header implies, without the padding to a whole block


def _card_text(image: bytes) -> str:
    return image.decode("ascii", errors="replace")


def _first_non_ascii(block: np.ndarray) -> int | None:
    """Offset of the first byte outside printable ASCII (0x20-0x7E), or None."""
    bad = np.flatnonzero((block < 0x20) | (block > 0x7E))
    return int(bad[0]) if bad.size else None


def _int(values: dict[str, object], key: str, index: int, default: int | None = None) -> int:
    """A structural keyword's integer value; `CorruptFitsError` when missing or not an integer."""
    value = values.get(key, default)
    if value is None:
        raise CorruptFitsError(
            f"header of HDU {index} lacks {key}: not a valid FITS header; re-download the file"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptFitsError(
            f"header of HDU {index} has {key} = {value!r}, not an integer: not a valid FITS "
            "header; re-download the file"
        )
    return value


def _data_bytes(values: dict[str, object], index: int) -> int:
    """Data size in bytes implied by the structural keywords (FITS 4.0 eqs. 1 and 2)."""
    bitpix = _int(values, "BITPIX", index)
    naxis = _int(values, "NAXIS", index)
    if bitpix not in (8, 16, 32, 64, -32, -64) or not 0 <= naxis <= 999:
        raise CorruptFitsError(
            f"header of HDU {index} has BITPIX = {bitpix}, NAXIS = {naxis}: not a valid FITS "
            "header; re-download the file"
        )
    if naxis == 0:
        return 0
    axes = [_int(values, f"NAXIS{k}", index) for k in range(1, naxis + 1)]
    if any(n < 0 for n in axes):
        raise CorruptFitsError(f"header of HDU {index} has a negative axis length {axes}")
    if values.get("GROUPS") is True and axes[0] == 0:
        axes = axes[1:]  # random groups: NAXIS1 = 0 is a flag, not an axis
    pcount = _int(values, "PCOUNT", index, default=0)
    gcount = _int(values, "GCOUNT", index, default=1)
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))


_STRUCTURAL = ("BITPIX", "GROUPS", "PCOUNT", "GCOUNT")


def _read_header(
    data: bytes, start: int, index: int, *, all_values: bool
) -> tuple[int, dict[str, object]]:
    """Check one header from `start`: printable ASCII, valid keywords, parsable values (every
    card's with `all_values`, else the structural ones'), an END card. Returns (offset after
    the header's last block, structural keyword values)."""
    n = len(data)
    values: dict[str, object] = {}
    previous = "(start of header)"
    card_no = 0
    pos = start
    while True:
        if pos + BLOCK_BYTES > n:
            raise CorruptFitsError(
                f"truncated: header of HDU {index} has no END card before the end of the file "
                f"({n} bytes, last card read {previous}); re-download it"
            )
        block = np.frombuffer(data, dtype=np.uint8, count=BLOCK_BYTES, offset=pos)
        bad = _first_non_ascii(block)
        for k in range(BLOCK_BYTES // CARD_BYTES):
            card_no += 1
            if bad is not None and bad < (k + 1) * CARD_BYTES:
                raise CorruptFitsError(
                    f"corrupt header: card {card_no} of HDU {index} (after {previous}) holds "
                    f"non-ASCII bytes (byte {pos + bad} of the file); the file is damaged: "
                    "re-download it"
                )
            image = data[pos + k * CARD_BYTES : pos + (k + 1) * CARD_BYTES]
            keyword = _card_text(image[:8]).rstrip()
            if keyword == "END":
                return pos + BLOCK_BYTES, values
            if keyword == "HIERARCH":
                previous = "HIERARCH"
                continue
            if _KEYWORD.fullmatch(keyword) is None:
                raise CorruptFitsError(
                    f"corrupt header: card {card_no} of HDU {index} (after {previous}) has an "
                    f"invalid keyword {keyword!r}; the file is damaged: re-download it"
                )
            structural = keyword in _STRUCTURAL or keyword.startswith("NAXIS")
            if (all_values or structural) and keyword not in _COMMENTARY and image[8:10] == b"= ":
                try:
                    value = fits.Card.fromstring(_card_text(image)).value
                except (VerifyError, ValueError) as exc:
                    raise CorruptFitsError(
                        f"corrupt header: card {card_no} of HDU {index} ({keyword}) has an "
                        f"unparsable value {_card_text(image[10:40]).strip()!r}; the file is "
                        "damaged: re-download it"
                    ) from exc
                if structural:
                    values[keyword] = value
            previous = keyword or previous
        pos += BLOCK_BYTES


def check_fits(data: bytes, *, all_values: bool = True) -> list[HduLayout]:
    """Check that `data` is a whole FITS file: every header is printable ASCII with valid
    keywords, parsable values and an END card, and every HDU's data (as its BITPIX, NAXISn,
    PCOUNT, GCOUNT imply) is present. Missing padding after the last data is tolerated (the
    data is whole). `all_values=False` parses only the structural keywords' values (the cheap
    check for every read of a stored product). Raises `CorruptFitsError` (a ValueError) saying
    what is wrong and what to do; returns the HDUs' layout."""
    if not data.startswith(b"SIMPLE  ="):
        raise CorruptFitsError("not a FITS file: it does not start with SIMPLE =")
    layouts: list[HduLayout] = []
    pos = 0
    n = len(data)
    while True:
        index = len(layouts)
        data_start, values = _read_header(data, pos, index, all_values=all_values)
        size = _data_bytes(values, index)
        present = n - data_start
        if present < size:
            where = "" if index == 0 else f" of HDU {index}"
            raise CorruptFitsError(
                f"truncated: header{where} promises {size} bytes of data, file has {present}; "
                "re-download it"
            )
        layouts.append(HduLayout(index, pos, data_start, size))
        pos = data_start + -(-size // BLOCK_BYTES) * BLOCK_BYTES
        # anything after the last HDU that is not an extension (zero fill, special records)
        # is not FITS structure: astropy ignores it, and so does this check
        if pos >= n or not data.startswith(b"XTENSION", pos):
            return layouts
