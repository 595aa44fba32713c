"""In-memory view of one Basic Calibrated Data frame (BCD + uncertainty + status mask).

Mosaic and extract work on these, whoever made the files: skybus's calibrate, the SSC
archive, or another tool writing Spitzer-format BCDs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from shared import fitsio


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
        """Build a frame from opened FITS files; a missing uncertainty is estimated from the
        frame's robust scatter, a missing mask is all zero."""
        header = bcd[0].header.copy()
        data = np.asarray(bcd[0].data, dtype=np.float32)
        if data.ndim != 2:
            raise ValueError(f"BCD image must be 2-D, got shape {data.shape}")
        if bunc is not None:
            unc = np.asarray(bunc[0].data, dtype=np.float32)
        else:
            finite = data[np.isfinite(data)]
            mad = np.median(np.abs(finite - np.median(finite))) if finite.size else 1.0
            unc = np.full(data.shape, max(1.4826 * float(mad), 1e-12), dtype=np.float32)
        if mask is not None:
            m = np.asarray(mask[0].data).astype(np.int64) & 0xFFFF
        else:
            m = np.zeros(data.shape, dtype=np.int64)
        if unc.shape != data.shape or m.shape != data.shape:
            raise ValueError(
                f"BCD, uncertainty and mask shapes differ: {data.shape}, {unc.shape}, {m.shape}"
            )
        return cls(data=data, unc=unc, mask=m.astype(np.int32), header=header, key=key)


async def read_frames(
    read_fits: Callable[[str], Awaitable[fits.HDUList]], members: Iterable[Mapping[str, str]]
) -> list[BCDFrame]:
    """Load frames listed as {"key": bcd, "bunc": key or "", "mask": key or ""} (the members
    of an AOR group, or a mosaic's frames manifest) through `read_fits`."""
    frames = []
    for m in members:
        bunc = await read_fits(m["bunc"]) if m.get("bunc") else None
        mask = await read_fits(m["mask"]) if m.get("mask") else None
        frames.append(BCDFrame.from_hdus(await read_fits(m["key"]), bunc, mask, key=m["key"]))
    return frames
