"""IPAC and FITS source-table writers and readers (round trip, fitsverify)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from astropy.io.fits import open as fits_open
from astropy.table import Table

from services.extract import from_fits_hdulist, from_ipac_bytes, to_fits_hdulist, to_ipac_bytes


def _table() -> Table:
    t = Table()
    t["srcid"] = np.array([1, 2, 3], dtype=np.int32)
    t["RA"] = [150.1, 150.2, 150.3]
    t["RA"].unit = "deg"
    t["flux"] = [1.5, np.nan, 3.25]
    t["flux"].unit = "uJy"
    t["flag_70um"] = ["D", "U", "N"]
    t["CnfFlag"] = ["0", "1", "0"]
    t.meta.update({"BAND": "24um", "FWHM": 5.9, "APCORR": 1.16})
    return t


def test_ipac_round_trip():
    data = to_ipac_bytes(_table())
    text = data.decode("ascii")
    assert text.startswith("\\BAND") or "\\BAND" in text
    assert "|" in text and "null" in text
    back = from_ipac_bytes(data)
    assert list(back["srcid"]) == [1, 2, 3]
    assert np.isnan(back["flux"][1]) and back["flux"][2] == pytest.approx(3.25)
    assert str(back["flux"].unit) == "uJy"
    assert list(back["flag_70um"]) == ["D", "U", "N"]
    assert back.meta["FWHM"] == pytest.approx(5.9)


def test_fits_round_trip_and_fitsverify(tmp_path):
    hdul = to_fits_hdulist(_table(), {"TELESCOP": "Spitzer", "INSTRUME": "MIPS",
                                      "CHNLNUM": 1})
    assert hdul[1].header["TUNIT3"] == "uJy"
    assert hdul[0].header["INSTRUME"] == "MIPS"
    path = tmp_path / "src.fits"
    hdul.writeto(path)
    back = from_fits_hdulist(hdul)
    assert list(back["flag_70um"]) == ["D", "U", "N"]
    assert np.isnan(back["flux"][1])
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify not installed")
    res = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 error" in res.stdout or "OK" in res.stdout


def test_bad_bytes_raise():
    from services.extract.tables import TableFormatError

    with pytest.raises(TableFormatError):
        from_ipac_bytes(b"this is not a table\x00\x01")


def test_fits_bytes_round_trip_keeps_meta():
    from services.extract import from_fits_bytes, to_fits_bytes

    back = from_fits_bytes(to_fits_bytes(_table(), {"AORKEY": 123}))
    assert list(back["srcid"]) == [1, 2, 3]
    assert back.meta["FWHM"] == pytest.approx(5.9)  # bandmerge reads the FWHM from here


def test_long_meta_strings_pass_fitsverify_without_warnings(tmp_path):
    # e.g. PRFWHY, the reason for the PSF model: longer than one card, continued over
    # CONTINUE cards, which the header must declare (LONGSTRN).
    t = _table()
    t.meta["PRFWHY"] = ("the diffraction pattern fits the 18 bright sources better: chi^2 5903 "
                        "against 15342 for the Gaussian")
    path = tmp_path / "long.fits"
    to_fits_hdulist(t).writeto(path)
    assert from_fits_hdulist(fits_open(path)).meta["PRFWHY"] == t.meta["PRFWHY"]
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify not installed")
    res = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
    assert "0 warnings and 0 errors" in res.stdout or "OK" in res.stdout, res.stdout
