"""A file's image wherever other tools put it: the primary HDU, an image extension after an
empty primary, or a tile-compressed extension (`.fits.fz`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits

from shared import fitsio
from shared.bcd import BCDFrame
from tests.ingest import archive


def _layout(kind: str, data: np.ndarray, header: fits.Header) -> fits.HDUList:
    """The same image and keywords in one of three layouts; in the two extension layouts the
    observation keywords stay in the primary and the WCS and BUNIT go with the image."""
    if kind == "primary":
        return fits.HDUList([fits.PrimaryHDU(data, header)])
    wcs_keys = [k for k in header
                if k.startswith(("CTYPE", "CRPIX", "CRVAL", "CD")) or k == "BUNIT"]
    primary = fits.PrimaryHDU(
        header=fits.Header([c for c in header.cards if c.keyword not in wcs_keys]))
    ext_header = fits.Header([c for c in header.cards if c.keyword in wcs_keys])
    ext = (fits.ImageHDU(data, ext_header, name="IMAGE") if kind == "extension"
           else fits.CompImageHDU(data, ext_header, compression_type="RICE_1",
                                  quantize_level=64.0))
    # through bytes, as ingest receives files
    buf = io.BytesIO()
    fits.HDUList([primary, ext]).writeto(buf)
    return fits.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("kind", ["primary", "extension", "compressed"])
def test_image_and_header_in_any_layout(kind: str) -> None:
    header = archive.header(1, dcenum=3)
    data = (20 + np.random.default_rng(1).normal(0, 0.1, (16, 16))).astype(np.float32)
    hdul = _layout(kind, data, header)
    image, merged = fitsio.image_hdu(hdul)
    assert np.allclose(np.asarray(image), data, atol=0.01)
    for key in ("TELESCOP", "AORKEY", "DCENUM", "CTYPE1", "CD1_1", "BUNIT"):
        value = header[key]
        assert merged[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert fitsio.celestial_wcs_problem(merged) is None
    assert fitsio.image_header(hdul)["DCENUM"] == 3
    frame = BCDFrame.from_hdus(hdul)
    assert frame.dcenum == 3 and frame.data.shape == (16, 16)


def test_extension_keywords_win_and_structure_is_not_copied() -> None:
    primary = fits.PrimaryHDU(header=fits.Header({"AORKEY": 1, "BUNIT": "DN/s", "EXTEND": True}))
    ext = fits.ImageHDU(np.zeros((4, 5), np.float32), fits.Header({"BUNIT": "MJy/sr"}))
    _, merged = fitsio.image_hdu(fits.HDUList([primary, ext]))
    assert merged["BUNIT"] == "MJy/sr" and merged["AORKEY"] == 1
    assert "EXTEND" not in merged and merged["NAXIS1"] == 5
    # a table extension is not an image: the (empty) primary stays the image
    table = fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.zeros(3))])
    data, header = fitsio.image_hdu(fits.HDUList([fits.PrimaryHDU(), table]))
    assert data is None and header["NAXIS"] == 0


def _hdul(data: np.ndarray, header: fits.Header) -> fits.HDUList:
    return fits.HDUList([fits.PrimaryHDU(data, header)])


def test_bcds_as_other_tools_write_them() -> None:
    """A single-plane cube (NAXIS3 = 1), a bunc with no usable value, and BUNIT spellings of
    MJy/sr: each still gives a usable frame, and frames of one AOR agree on their unit."""
    header = archive.header(1, dcenum=2)
    data = (20 + np.random.default_rng(2).normal(0, 0.1, (16, 16))).astype(np.float32)
    cube = BCDFrame.from_hdus(_hdul(data[None], header), _hdul(np.full((1, 16, 16), 0.1,
                                                                       np.float32), header))
    assert cube.data.shape == (16, 16) and cube.unc.shape == (16, 16)
    assert "NAXIS3" not in cube.header and cube.header["NAXIS"] == 2

    zero = BCDFrame.from_hdus(_hdul(data, header), _hdul(np.zeros_like(data), header))
    assert np.all(zero.unc > 0) and float(zero.unc[0, 0]) == pytest.approx(0.1, rel=0.3)
    assert "unc estimated" in str(zero.header["HISTORY"])

    units = set()
    for spelling in ("MJY/SR", "MJy sr-1", "mjy/sr", "MJy / sr", "MJy.sr-1"):
        h = header.copy()
        h["BUNIT"] = spelling
        units.add(BCDFrame.from_hdus(_hdul(data, h)).header["BUNIT"])
    assert units == {"MJy/sr"}
