"""The MIPS calibration files a DCE is calibrated with: dark, flat, pmask and Ge stim."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from services.calibrate.mips.errors import MipsCalibrateError

#: The calibration types we use, by header CALTYPE.
CALTYPES = ("DARK", "FLAT", "PMASK", "STIM")


class CalibrationFileError(MipsCalibrateError):
    """A calibration file is malformed: no CALTYPE/CHNLNUM, wrong shape, or a duplicate.

    What next: fix or replace the calibration file; the DCEs that need it are dead-lettered.
    """


@dataclass(frozen=True, slots=True)
class CalImage:
    """One calibration image of one channel.

    `data` is in the unit of its type: DARK DN/s, FLAT dimensionless (median 1), PMASK integer
    bits, STIM unused (the stim level is `header['STIMLVL']`, instrument units). `unc` is the
    1-sigma uncertainty in the same unit when the file carries one (extension UNC or ERR).
    """

    caltype: str
    channel: int
    data: np.ndarray
    name: str
    header: fits.Header
    unc: np.ndarray | None = None


def _cal_name(hdul: fits.HDUList, header: fits.Header, caltype: str, channel: int) -> str:
    for key in ("FILENAME", "CALNAME", "ORIGFILE"):
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    path = hdul.filename()
    if path:
        return os.path.basename(path)
    return f"mips{channel}_{caltype.lower()}.fits"


def _read_cal(hdul: fits.HDUList, names: Mapping[int, str] | None, index: int) -> CalImage:
    if len(hdul) == 0:
        raise CalibrationFileError(f"calibration file #{index} is empty (no HDU)")
    header = hdul[0].header
    caltype = str(header.get("CALTYPE", "")).strip().upper()
    if caltype not in CALTYPES:
        raise CalibrationFileError(
            f"calibration file #{index} has CALTYPE={header.get('CALTYPE')!r}; "
            f"expected one of {', '.join(CALTYPES)}"
        )
    try:
        channel = int(header["CHNLNUM"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CalibrationFileError(
            f"calibration file #{index} ({caltype}) has no integer CHNLNUM: add it to the header"
        ) from exc
    raw = hdul[0].data
    if caltype == "STIM":
        data = np.zeros((0, 0)) if raw is None else np.asarray(raw, dtype=np.float64)
        if "STIMLVL" not in header:
            raise CalibrationFileError(
                f"STIM calibration file of channel {channel} has no STIMLVL (instrument units)"
            )
    else:
        if raw is None or np.ndim(raw) != 2:
            raise CalibrationFileError(
                f"{caltype} calibration file of channel {channel} must hold a 2-D primary image"
            )
        dtype = np.int64 if caltype == "PMASK" else np.float64
        data = np.asarray(raw).astype(dtype)
    unc = None
    for ext in ("UNC", "ERR"):
        if ext in hdul and hdul[ext].data is not None and np.shape(hdul[ext].data) == data.shape:
            unc = np.asarray(hdul[ext].data, dtype=np.float64)
            break
    name = names[index] if names and index in names else _cal_name(hdul, header, caltype, channel)
    return CalImage(caltype, channel, data, name, header.copy(), unc)


@dataclass(frozen=True, slots=True)
class MipsCalibration:
    """All calibration images, by (channel, CALTYPE). Any may be missing: the step is skipped."""

    images: dict[tuple[int, str], CalImage] = field(default_factory=dict)

    @classmethod
    def from_hdus(
        cls, hdus: Iterable[fits.HDUList], *, names: Mapping[int, str] | None = None
    ) -> MipsCalibration:
        """Index calibration HDULists by their header CHNLNUM and CALTYPE.

        `names` optionally gives the file name of the i-th HDUList (recorded in the BCD
        headers); otherwise the header FILENAME or the opened file's name is used.
        Raises `CalibrationFileError` on a malformed file or two files of the same kind.
        """
        images: dict[tuple[int, str], CalImage] = {}
        for i, hdul in enumerate(hdus):
            cal = _read_cal(hdul, names, i)
            key = (cal.channel, cal.caltype)
            if key in images:
                raise CalibrationFileError(
                    f"two {cal.caltype} calibration files for channel {cal.channel}: "
                    f"{images[key].name} and {cal.name}; pass only one"
                )
            images[key] = cal
        return cls(images)

    def get(self, channel: int, caltype: str) -> CalImage | None:
        """The calibration image of this channel and type, or None when missing."""
        return self.images.get((channel, caltype.upper()))

    def image(self, channel: int, caltype: str, shape: tuple[int, ...]) -> CalImage | None:
        """Like `get`, but checks the image shape against the DCE's array shape."""
        cal = self.get(channel, caltype)
        if cal is not None and caltype.upper() != "STIM" and cal.data.shape != shape:
            raise CalibrationFileError(
                f"{cal.caltype} file {cal.name} of channel {channel} has shape {cal.data.shape}, "
                f"but the array is {shape}"
            )
        return cal
