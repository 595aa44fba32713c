"""Reading BCD frames made by other tools: units, unreadable members, unusable WCS."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from astropy.io import fits

from shared import fitsio
from shared.bcd import BCDFrame, frame_problem, read_frames, surface_brightness_factor
from shared.instruments import mips


def _bcd(bunit: str | None, *, fluxconv: float | None = 0.0447, value: float = 2.0) -> fits.HDUList:
    h = fits.Header()
    h.update(mips.wcs_keywords(1, ra_deg=150.0, dec_deg=2.0, pa_deg=30.0))
    if bunit is not None:
        h["BUNIT"] = bunit
    if fluxconv is not None:
        h["FLUXCONV"] = fluxconv
    return fits.HDUList([fits.PrimaryHDU(np.full((16, 16), value, np.float32), header=h)])


def _unc(value: float = 0.1) -> fits.HDUList:
    return fits.HDUList([fits.PrimaryHDU(np.full((16, 16), value, np.float32))])


@pytest.mark.parametrize("bunit", ["MJy/sr", "MJy sr-1", " mjy/SR "])
def test_mjysr_frames_are_read_unchanged(bunit: str) -> None:
    f = BCDFrame.from_hdus(_bcd(bunit), _unc())
    assert np.all(f.data == 2.0) and np.all(f.unc == np.float32(0.1))


def test_dn_per_s_frames_are_converted_with_fluxconv() -> None:
    f = BCDFrame.from_hdus(_bcd("DN/s", fluxconv=0.0447), _unc(0.5))
    assert f.header["BUNIT"] == "MJy/sr"
    np.testing.assert_allclose(f.data, 2.0 * 0.0447, rtol=1e-6)
    np.testing.assert_allclose(f.unc, 0.5 * 0.0447, rtol=1e-6)
    assert "FLUXCONV" in str(f.header["HISTORY"])


@pytest.mark.parametrize(
    ("bunit", "fluxconv", "words"),
    [
        (None, 0.0447, "no BUNIT"),
        ("", 0.0447, "no BUNIT"),
        ("DN/s", None, "FLUXCONV"),
        ("DN/s", -1.0, "FLUXCONV"),
        ("Jy/beam", 0.0447, "not a surface brightness"),
        ("MJy/str", 0.0447, "not a surface brightness"),
    ],
)
def test_unusable_units_are_refused_with_what_to_set(
    bunit: str | None, fluxconv: float | None, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        surface_brightness_factor(_bcd(bunit, fluxconv=fluxconv)[0].header)
    with pytest.raises(ValueError, match=words):
        BCDFrame.from_hdus(_bcd(bunit, fluxconv=fluxconv))


def _bytes(hdul: fits.HDUList) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def test_read_frames_reports_and_skips_bad_members() -> None:
    good = _bytes(_bcd("MJy/sr"))
    no_wcs = _bcd("MJy/sr")
    del no_wcs[0].header["CRVAL1"]
    store = {
        "good1": good,
        "good2": good,
        "truncated": good[: len(good) - 2000],  # the padding and 144 bytes of the data lost
        "not_fits": b"README: this is not a FITS file\n" * 100,
        "no_wcs": _bytes(no_wcs),
        "dn": _bytes(_bcd(None)),
    }

    async def read_fits(key: str) -> fits.HDUList:
        return fitsio.open_bytes(store[key])

    members = [{"key": k, "bunc": "", "mask": ""} for k in store]
    bad: dict[str, str] = {}
    frames = asyncio.run(read_frames(read_fits, members, on_bad=bad.__setitem__))
    assert [f.key for f in frames] == ["good1", "good2"]
    assert set(bad) == {"truncated", "not_fits", "no_wcs", "dn"}
    assert "CRVAL1" in bad["no_wcs"] and "BUNIT" in bad["dn"]
    # without on_bad the first bad member still raises (callers that need every frame)
    with pytest.raises(ValueError):
        asyncio.run(read_frames(read_fits, members))


def test_frame_problem_names_what_is_wrong() -> None:
    ok = BCDFrame.from_hdus(_bcd("MJy/sr"))
    assert frame_problem(ok) is None
    h = ok.header.copy()
    h["CTYPE1"], h["CTYPE2"] = "LINEAR", "LINEAR"
    assert "celestial" in str(frame_problem(BCDFrame(ok.data, ok.unc, ok.mask, h)))
    nan = np.full_like(ok.data, np.nan)
    assert "finite" in str(frame_problem(BCDFrame(nan, ok.unc, ok.mask, ok.header)))


@pytest.mark.parametrize("channel", [1, 2])
def test_ge_masks_from_other_tools_flag_the_bad_half(channel: int) -> None:
    """A 70 um mask with the Ge pmask's bad-half bit (8) set on the bad half makes those
    pixels unusable; at 24 um bit 8 is not the bad half and stays as it is."""
    bcd = _bcd("MJy/sr")
    bcd[0].header["CHNLNUM"] = channel
    mask = np.zeros((16, 16), np.int16)
    mask[8:] = mips.GE_PMASK_BAD_HALF
    f = BCDFrame.from_hdus(bcd, _unc(), fits.HDUList([fits.PrimaryHDU(mask)]))
    usable = f.usable_pixels(mips.FATAL_BITS)
    assert usable[:8].all()
    assert usable[8:].any() == (channel == 1)
