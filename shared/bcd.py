"""In-memory view of one Basic Calibrated Data frame (BCD + uncertainty + status mask).

Mosaic and extract work on these, whoever made the files: skybus's calibrate, the SSC
archive, or another tool writing Spitzer-format BCDs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from shared import fitsio
from shared.errors import BadData
from shared.instruments import mips


@dataclass(frozen=True, slots=True)
class BCDFrame:
    """One calibrated frame: surface brightness, its 1-sigma uncertainty and its status mask.

    `data` and `unc` are float32 in the unit of `header['BUNIT']` (MJy/sr for Spitzer);
    `mask` holds the status bits (bbmsk / bmask); `header` carries the TAN(-SIP) WCS and the
    mission keywords (AORKEY, EXPID, DCENUM, CHNLNUM, EXPTIME ...). `key` names the object in
    the store that the frame came from (provenance), empty for frames made in memory.
    """

    data: np.ndarray
    unc: np.ndarray
    mask: np.ndarray
    header: fits.Header
    key: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def wcs(self) -> WCS:
        """The frame's celestial WCS (TAN-SIP), parsed from its WCS keywords only."""
        return WCS(fitsio.wcs_cards(self.header), relax=True, naxis=2)

    @property
    def has_consistent_arrays(self) -> bool:
        """data is 2-D and unc and mask have its shape."""
        return (
            np.ndim(self.data) == 2
            and np.shape(self.unc) == np.shape(self.data)
            and np.shape(self.mask) == np.shape(self.data)
        )

    def usable_pixels(self, fatal_bits: int) -> np.ndarray:
        """Pixels that carry flux: finite data, finite unc > 0 and none of `fatal_bits`."""
        unc = np.asarray(self.unc)
        return (
            np.isfinite(self.data)
            & np.isfinite(unc)
            & (unc > 0)
            & ((np.asarray(self.mask).astype(np.int64) & int(fatal_bits)) == 0)
        )

    @property
    def dcenum(self) -> int:
        return int(self.header.get("DCENUM", -1))

    @property
    def channel(self) -> int:
        return int(self.header.get("CHNLNUM", 0))

    @property
    def exptime_s(self) -> float:
        return float(self.header.get("EXPTIME", 0.0))

    @classmethod
    def from_hdus(
        cls,
        bcd: fits.HDUList,
        bunc: fits.HDUList | None = None,
        mask: fits.HDUList | None = None,
        *,
        key: str = "",
    ) -> BCDFrame:
        """Build a frame from opened FITS files (each one's image: the primary HDU's, or the
        first image extension's, see `fitsio.image_hdu`); a missing uncertainty is estimated
        from the frame's robust scatter (also when the bunc holds no finite value > 0), a
        missing mask is all zero. Data in DN/s are converted
        to MJy/sr with the header's FLUXCONV (and BUNIT, HISTORY say so); any other BUNIT, or
        none, is refused (ValueError), since every flux downstream assumes MJy/sr."""
        raw, header = fitsio.image_hdu(bcd)
        data = np.asarray(raw, dtype=np.float32)
        if data.ndim != 2:
            raise ValueError(f"BCD image must be 2-D, got shape {data.shape}")
        if bunc is not None:
            unc = np.asarray(fitsio.image_hdu(bunc)[0], dtype=np.float32)
            if unc.shape == data.shape and not np.any(np.isfinite(unc) & (unc > 0)):
                # an uncertainty image with no usable value carries no information
                header["HISTORY"] = "skybus: bunc has no finite value > 0; unc estimated"
                bunc = None
        if bunc is None:
            finite = data[np.isfinite(data)]
            mad = np.median(np.abs(finite - np.median(finite))) if finite.size else 1.0
            unc = np.full(data.shape, max(1.4826 * float(mad), 1e-12), dtype=np.float32)
        if mask is not None:
            m = ge_mask_in_skybus_bits(
                np.asarray(fitsio.image_hdu(mask)[0]).astype(np.int64) & 0xFFFF, header
            )
        else:
            m = np.zeros(data.shape, dtype=np.int64)
        if unc.shape != data.shape or m.shape != data.shape:
            raise ValueError(
                f"BCD, uncertainty and mask shapes differ: {data.shape}, {unc.shape}, {m.shape}"
            )
        to_mjysr = surface_brightness_factor(header)
        if to_mjysr != 1.0:
            data = (data * to_mjysr).astype(np.float32)
            unc = (unc * to_mjysr).astype(np.float32)
            header["HISTORY"] = (
                f"skybus: {header['BUNIT']} x FLUXCONV {to_mjysr:g} -> MJy/sr (data and unc)"
            )
        header["BUNIT"] = "MJy/sr"  # one spelling: the frames of a mosaic must agree
        return cls(data=data, unc=unc, mask=m.astype(np.int32), header=header, key=key)


def ge_mask_in_skybus_bits(mask: np.ndarray, header: Mapping[str, object]) -> np.ndarray:
    """A Ge (70/160 um) status mask in skybus's bit layout: masks written by other tools use
    the Ge pmask's bit 8 for the 70 um bad half, which skybus keeps in `MaskBit.BAD_HALF`
    (fatal); skybus's own masks never set bit 8, so they pass unchanged."""
    if int(header.get("CHNLNUM", 0) or 0) not in (2, 3):  # type: ignore[call-overload]
        return mask
    half = (mask & mips.GE_PMASK_BAD_HALF) != 0
    return np.where(half, mask | int(mips.MaskBit.BAD_HALF), mask)


_MJYSR = {"mjy/sr", "mjy sr-1", "mjy sr**-1", "mjy/steradian", "mjy.sr**-1", "mjy sr^-1"}
_DN_PER_S = {"dn/s", "dn/sec", "dn s-1", "dn s**-1", "dn.s**-1", "dn s^-1", "adu/s"}


def is_mjy_per_sr(bunit: object) -> bool:
    """Whether a BUNIT value says MJy/sr: one of its usual spellings in any case, or any
    spelling astropy's unit parser reads as MJy/sr ('MJy / sr', 'MJy.sr-1' ...)."""
    text = " ".join(str(bunit or "").strip().split())
    if text.lower() in _MJYSR:
        return True
    try:
        return bool(u.Unit(text, parse_strict="raise") == u.MJy / u.sr)
    except (ValueError, TypeError):
        return False


def surface_brightness_factor(header: Mapping[str, object]) -> float:
    """Factor that turns a BCD's pixel values into MJy/sr, from BUNIT (and FLUXCONV for DN/s).

    Raises ValueError, saying what to set, when BUNIT is missing or not a known unit.
    """
    raw = header.get("BUNIT")
    if raw is None or not str(raw).strip():
        raise ValueError(
            "BCD header has no BUNIT: set BUNIT = 'MJy/sr' (Spitzer BCDs), or 'DN/s' together "
            "with FLUXCONV (MJy/sr per DN/s)"
        )
    unit = " ".join(str(raw).strip().lower().split())
    if is_mjy_per_sr(raw):
        return 1.0
    if unit in _DN_PER_S:
        conv = header.get("FLUXCONV")
        try:
            factor = float(conv)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            factor = float("nan")
        if not np.isfinite(factor) or factor <= 0:
            raise ValueError(
                f"BCD is in {raw} but FLUXCONV is {conv!r}: add FLUXCONV (MJy/sr per DN/s) "
                "to convert it"
            )
        return factor
    raise ValueError(
        f"BCD BUNIT {raw!r} is not a surface brightness skybus can use: MJy/sr, or DN/s with "
        "FLUXCONV"
    )


def frame_problem(frame: BCDFrame) -> str | None:
    """Why `frame` cannot be mosaicked or measured (inconsistent arrays, no usable pixel, no
    celestial WCS), or None when it can."""
    if not frame.has_consistent_arrays:
        return "data, unc and mask shapes differ or are not 2-D"
    wcs_problem = fitsio.celestial_wcs_problem(frame.header)
    if wcs_problem is not None:
        return f"{wcs_problem}: the frame has no usable celestial WCS"
    if not np.any(np.isfinite(frame.data) & np.isfinite(frame.unc)):
        return "no finite pixel"
    return None


async def read_frames(
    read_fits: Callable[[str], Awaitable[fits.HDUList]],
    members: Iterable[Mapping[str, str]],
    *,
    on_bad: Callable[[str, str], None] | None = None,
) -> list[BCDFrame]:
    """Load frames listed as {"key": bcd, "bunc": key or "", "mask": key or ""} (the members
    of an AOR group, or a mosaic's frames manifest) through `read_fits`.

    Without `on_bad` an unreadable frame raises; with it, a frame that cannot be read or used
    (`frame_problem`) is reported as on_bad(bcd key, reason) and left out, so that one bad file
    does not cost the rest of the group.
    """
    frames = []
    for m in members:
        try:
            bunc = await read_fits(m["bunc"]) if m.get("bunc") else None
            mask = await read_fits(m["mask"]) if m.get("mask") else None
            frame = BCDFrame.from_hdus(await read_fits(m["key"]), bunc, mask, key=m["key"])
        except (OSError, ValueError, TypeError, IndexError, BadData) as exc:
            if on_bad is None:
                raise
            on_bad(m["key"], f"cannot be read as a BCD ({exc})")
            continue
        if on_bad is not None and (problem := frame_problem(frame)) is not None:
            on_bad(m["key"], problem)
            continue
        frames.append(frame)
    return frames
