"""BCD products: names, headers (steps, WCS, provenance), dtypes, fitsverify, skipped steps."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _mips_calib_forward import simulate_24
from astropy.io import fits

from services.calibrate.mips import (
    CalibrationFileError,
    MipsCalibrateConfig,
    MipsCalibration,
    calibrate_ge_group,
    calibrate_mips24_dce,
)
from shared.bcd import BCDFrame
from shared.instruments import mips
from shared.instruments.mips import MaskBit

REQUIRED = (
    "TELESCOP", "INSTRUME", "CHNLNUM", "AORKEY", "EXPID", "DCENUM", "AOT_TYPE", "EXPTIME",
    "DATE_OBS", "MJD_OBS", "SCLK_OBS", "BUNIT", "FLUXCONV", "PXSCAL1", "PXSCAL2", "PA",
    "CREATOR", "CTYPE1", "CTYPE2", "A_ORDER", "AP_ORDER",
)  # fmt: skip


def test_24um_products_names_and_headers() -> None:
    case = simulate_24(7, n_cr=5)
    p = calibrate_mips24_dce(
        case.raw, MipsCalibration.from_hdus(case.calibration), creator="skybus 9.9", version=3
    )
    assert set(p.names) == {"bcd", "bunc", "bbmsk"}
    assert p.names["bcd"] == mips.bcd_name(1, 12345678, 3, 5, 3, "bcd")
    for kind, hdul in (("bcd", p.bcd), ("bunc", p.bunc), ("bbmsk", p.mask)):
        h = hdul[0].header
        for key in REQUIRED:
            assert key in h, f"{kind} lacks {key}"
        assert h["CREATOR"] == "skybus 9.9"
        for step in ("RAMPFIT", "DARKSUB", "FLATFLD", "DCECORR", "FLUXCAL", "CRFLAG", "PMASKAPP"):
            assert h[step] == "COMPLETE"
        assert h["DARKFILE"] == "mips24_dark.fits" and h["FLATFILE"] == "mips24_flat.fits"
        assert len(h["HISTORY"]) >= 7
    assert p.bcd[0].header["BUNIT"] == "MJy/sr"
    assert p.bcd[0].data.dtype == np.float32 and p.bunc[0].data.dtype == np.float32
    assert p.mask[0].data.dtype == np.int16
    frame = p.frame()
    assert isinstance(frame, BCDFrame) and frame.channel == 1 and frame.dcenum == 5
    assert np.all(p.mask[0].data[case.calibration[2][0].data != 0] & int(MaskBit.PMASK))


def test_missing_calibration_is_skipped_and_recorded() -> None:
    case = simulate_24(8, n_cr=0)
    cal = MipsCalibration.from_hdus(
        [h for h in case.calibration if h[0].header["CALTYPE"] == "FLAT"]
    )
    p = calibrate_mips24_dce(case.raw, cal)
    h = p.bcd[0].header
    assert h["DARKSUB"] == "SKIPPED" and h["PMASKAPP"] == "SKIPPED" and h["FLATFLD"] == "COMPLETE"
    assert "DARKFILE" not in h
    assert np.all(p.mask[0].data & int(MaskBit.NO_CALIBRATION))


def test_bad_calibration_files_raise() -> None:
    case = simulate_24(9, n_cr=0)
    with pytest.raises(CalibrationFileError, match="two FLAT"):
        MipsCalibration.from_hdus([case.calibration[1], case.calibration[1]])
    small = fits.HDUList([fits.PrimaryHDU(np.ones((4, 4)))])
    small[0].header["CALTYPE"] = "DARK"
    small[0].header["CHNLNUM"] = 1
    with pytest.raises(CalibrationFileError, match="shape"):
        calibrate_mips24_dce(case.raw, MipsCalibration.from_hdus([small]))
    nokind = fits.HDUList([fits.PrimaryHDU(np.ones((4, 4)))])
    with pytest.raises(CalibrationFileError, match="CALTYPE"):
        MipsCalibration.from_hdus([nokind])


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="first_dce_depression"):
        MipsCalibrateConfig(first_dce_depression=1.5)
    with pytest.raises(ValueError, match="cr_background_box_px"):
        MipsCalibrateConfig(cr_background_box_px=4)


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="fitsverify not installed")
def test_products_pass_fitsverify(tmp_path: Path, sim_small) -> None:
    cal = MipsCalibration.from_hdus(sim_small.calibration)
    raw24 = next(r for r in sim_small.raw_dces if r[0].header["CHNLNUM"] == 1)
    ge = [r for r in sim_small.raw_dces if r[0].header["CHNLNUM"] == 2]
    products = [calibrate_mips24_dce(raw24, cal), calibrate_ge_group(ge, cal)[0]]
    paths = []
    for p in products:
        for name, hdul in p.files().items():
            path = tmp_path / name
            hdul.writeto(path)
            paths.append(path)
    assert any(p.name.endswith("_fbcd.fits") for p in paths)
    assert any(p.name.endswith("_bmask.fits") for p in paths)
    for path in paths:
        out = subprocess.run(
            ["fitsverify", "-q", "-e", str(path)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0 and "verification OK" in out.stdout, out.stdout + out.stderr
        # round trip: the mosaic's reader accepts them
    frame = BCDFrame.from_hdus(
        *(fits.open(tmp_path / products[0].names[k]) for k in ("bcd", "bunc", "bbmsk"))
    )
    assert frame.mask.max() < 2**15
