"""Recognising Spitzer archive FITS files by name and header."""

from __future__ import annotations

import pytest
from astropy.io import fits

from services.ingest.mips import SpitzerNameMismatchError, recognise_spitzer_fits


def _header(**kw: object) -> fits.Header:
    h = fits.Header()
    h["TELESCOP"] = "Spitzer"
    h["INSTRUME"] = "MIPS"
    for k, v in kw.items():
        h[k] = v
    return h


@pytest.mark.parametrize(
    ("name", "level", "ptype", "ch", "dce"),
    [
        ("SPITZER_M1_12345678_0004_0002_1_bcd.fits", "bcd", "bcd", 1, 2),
        ("SPITZER_M1_12345678_0004_0002_3_bunc.fits", "bcd", "bunc", 1, 2),
        ("SPITZER_M1_12345678_0004_0002_3_bbmsk.fits", "bcd", "bbmsk", 1, 2),
        ("SPITZER_M2_12345678_0004_0002_3_bmask.fits", "bcd", "bmask", 2, 2),
        ("some/dir/SPITZER_M2_12345678_0000_0011_1_raw.fits", "raw", "raw", 2, 11),
        ("SPITZER_I1_12345678_0004_0002_7_cbcd.fits", "bcd", "cbcd", 1, 2),
        ("SPITZER_I3_12345678_0004_0002_7_dce.fits", "raw", "dce", 3, 2),
        ("SPITZER_M1_12345678_0000_1_E7654321_maic.fits", "pbcd", "maic", 1, None),
    ],
)
def test_by_name(name: str, level: str, ptype: str, ch: int, dce: int | None) -> None:
    info = recognise_spitzer_fits(name)
    assert info is not None
    assert (info.level, info.product_type, info.channel, info.dcenum) == (level, ptype, ch, dce)
    assert info.aorkey == 12345678 and info.from_name
    assert info.instrument == ("IRAC" if "_I" in name else "MIPS")


def test_name_and_header_must_agree() -> None:
    name = "SPITZER_M1_12345678_0004_0002_1_bcd.fits"
    ok = _header(CHNLNUM=1, AORKEY=12345678, EXPID=4, DCENUM=2)
    assert recognise_spitzer_fits(name, ok) is not None
    with pytest.raises(SpitzerNameMismatchError, match="DCENUM"):
        recognise_spitzer_fits(name, _header(CHNLNUM=1, AORKEY=12345678, EXPID=4, DCENUM=3))
    with pytest.raises(SpitzerNameMismatchError, match="TELESCOP"):
        h = ok.copy()
        h["TELESCOP"] = "ISO"
        recognise_spitzer_fits(name, h)


def test_header_fallback() -> None:
    raw = _header(CHNLNUM=2, AORKEY=42, EXPID=1, DCENUM=5, BUNIT="DN")
    info = recognise_spitzer_fits("upload_001.fits", raw)
    assert info is not None and not info.from_name
    assert (info.level, info.product_type, info.channel, info.dcenum) == ("raw", "raw", 2, 5)
    bcd = _header(CHNLNUM=1, AORKEY=42, EXPID=1, DCENUM=5, BUNIT="MJy/sr", BITPIX=-32)
    info = recognise_spitzer_fits("x.fits", bcd)
    assert info is not None and (info.level, info.product_type) == ("bcd", "bcd")
    msk = _header(CHNLNUM=1, AORKEY=42, EXPID=1, DCENUM=5, BITPIX=16)
    info = recognise_spitzer_fits("x.fits", msk)
    assert info is not None and info.product_type == "bbmsk"


def test_not_spitzer() -> None:
    assert recognise_spitzer_fits("image.fits") is None
    assert recognise_spitzer_fits("image.fits", fits.Header({"TELESCOP": "ISO"})) is None
    # Spitzer but not enough keywords to place it
    assert recognise_spitzer_fits("x.fits", _header(CHNLNUM=1)) is None
    assert recognise_spitzer_fits("SPITZER_M1_bad_name.fits") is None


def test_renamed_product_type_is_refused() -> None:
    """A bunc or mask saved under a `_bcd.fits` name is refused, not mosaicked as the BCD."""
    ident = {"CHNLNUM": 1, "AORKEY": 12345678, "EXPID": 4, "DCENUM": 2, "NAXIS": 2}
    name = "SPITZER_M1_12345678_0004_0002_1_bcd.fits"
    bunc = _header(**ident, BITPIX=-32, FILENAME="SPITZER_M1_12345678_0004_0002_1_bunc.fits")
    with pytest.raises(SpitzerNameMismatchError, match=r"FILENAME.*renamed"):
        recognise_spitzer_fits(name, bunc)
    with pytest.raises(SpitzerNameMismatchError, match="BITPIX=16"):
        recognise_spitzer_fits(name, _header(**ident, BITPIX=16, BZERO=32768))
    mask_name = name.replace("_bcd.", "_bbmsk.")
    with pytest.raises(SpitzerNameMismatchError, match="status mask"):
        recognise_spitzer_fits(mask_name, _header(**ident, BITPIX=-32))
    # What agrees is accepted: FILENAME of the same type (another version), unsigned masks,
    # scaled-integer float images, raw counts, FILENAME that is not a Spitzer product name.
    same = _header(**ident, BITPIX=-32, FILENAME="SPITZER_M1_12345678_0004_0002_3_bcd.fits")
    assert recognise_spitzer_fits(name, same) is not None
    assert recognise_spitzer_fits(mask_name, _header(**ident, BITPIX=16, BZERO=32768))
    assert recognise_spitzer_fits(name, _header(**ident, BITPIX=16, BSCALE=0.01))
    raw = name.replace("_bcd.", "_raw.")
    assert recognise_spitzer_fits(raw, _header(**ident, BITPIX=16, BUNIT="DN"))
    assert recognise_spitzer_fits(name, _header(**ident, BITPIX=-32, FILENAME="MIPS.1.fits"))
