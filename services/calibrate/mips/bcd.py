"""BCD assembly: the bcd / bunc / bbmsk|bmask / fbcd HDULists and their full headers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from services.calibrate.mips.config import MipsCalibrateConfig
from services.calibrate.mips.steps import StepRecord
from shared.bcd import BCDFrame
from shared.instruments import mips

#: Raw-header keywords carried into every product (when present in the raw DCE).
CARRIED_KEYWORDS = (
    "TELESCOP",
    "INSTRUME",
    "CHNLNUM",
    "AORKEY",
    "EXPID",
    "DCENUM",
    "AOT_TYPE",
    "EXPTIME",
    "NSAMPLES",
    "NRAMPS",
    "DATE_OBS",
    "MJD_OBS",
    "SCLK_OBS",
    "RA_REF",
    "DEC_REF",
    "PA_REF",
    "SATLEVEL",
    "STIMFLSH",
    "NDCEGRP",
)


def mask_kind(channel: int) -> str:
    """Spitzer name of the per-DCE status mask: bbmsk at 24 um, bmask for Ge."""
    return "bbmsk" if channel == 1 else "bmask"


@dataclass(frozen=True, slots=True)
class BCDProducts:
    """The BCD-level products of one DCE, as HDULists ready to write.

    `bcd` (float32 MJy/sr), `bunc` (float32 1-sigma MJy/sr), `mask` (int16 `MaskBit` bits: the
    `bbmsk` at 24 um, `bmask` for Ge) and, for Ge, `fbcd` (float32 MJy/sr, median-filtered).
    `names` maps each kind ("bcd", "bunc", "bbmsk"/"bmask", "fbcd") to its Spitzer file name.
    """

    channel: int
    aorkey: int
    expid: int
    dcenum: int
    bcd: fits.HDUList
    bunc: fits.HDUList
    mask: fits.HDUList
    fbcd: fits.HDUList | None = None
    names: dict[str, str] = field(default_factory=dict)

    def files(self) -> dict[str, fits.HDUList]:
        """Every product by its file name."""
        out = {self.names["bcd"]: self.bcd, self.names["bunc"]: self.bunc}
        out[self.names[mask_kind(self.channel)]] = self.mask
        if self.fbcd is not None:
            out[self.names["fbcd"]] = self.fbcd
        return out

    def frame(self) -> BCDFrame:
        """The products as an in-memory `BCDFrame` (what mosaic and extract consume)."""
        return BCDFrame.from_hdus(self.bcd, self.bunc, self.mask, key=self.names["bcd"])


def product_header(
    raw_header: fits.Header,
    *,
    channel: int,
    kind: str,
    name: str,
    records: Sequence[StepRecord],
    config: MipsCalibrateConfig,
    creator: str,
    extra_history: Sequence[str] = (),
) -> fits.Header:
    """The full header of one product: mission keywords from the raw DCE, BUNIT, FLUXCONV,
    the TAN-SIP WCS of the commanded pointing, one keyword per step (COMPLETE/SKIPPED), the
    calibration file names, and HISTORY lines with the parameters."""
    hdr = fits.Header()
    for key in CARRIED_KEYWORDS:
        if key in raw_header:
            hdr[key] = (raw_header[key], raw_header.comments[key])
    hdr["TELESCOP"] = raw_header.get("TELESCOP", mips.TELESCOP)
    hdr["INSTRUME"] = raw_header.get("INSTRUME", mips.INSTRUME)
    if kind in ("bbmsk", "bmask"):
        hdr["BUNIT"] = ("", "status bits (shared.instruments.mips.MaskBit)")
    else:
        hdr["BUNIT"] = ("MJy/sr", "surface brightness")
    band = mips.BANDS[channel]
    hdr["FLUXCONV"] = (band.fluxconv, "MJy/sr per DN/s (24um) or per instr. unit (Ge)")
    wcs = mips.wcs_keywords(
        channel,
        ra_deg=float(raw_header["RA_REF"]),
        dec_deg=float(raw_header["DEC_REF"]),
        pa_deg=float(raw_header["PA_REF"]),
    )
    for key, value in wcs.items():
        hdr[key] = value
    hdr["CREATOR"] = (creator, "software that made this file")
    hdr["FILENAME"] = (name, "Spitzer product name")
    hdr["PRODTYPE"] = (kind, "BCD-level product type")
    for rec in records:
        hdr[rec.keyword] = (rec.status, "calibration step status")
        if rec.calfile is not None:
            hdr[rec.calfile[0]] = (rec.calfile[1], "calibration file used")
        for key, (value, comment) in rec.cards.items():
            hdr[key] = (value, comment)
    for rec in records:
        for line in rec.lines:
            hdr.add_history(line)
    for line in extra_history:
        hdr.add_history(line)
    params = ", ".join(f"{k}={v}" for k, v in config.as_dict().items())
    hdr.add_history(f"calibrate parameters: {params}")
    return hdr


def assemble(
    raw_header: fits.Header,
    *,
    channel: int,
    bcd_mjysr: np.ndarray,
    unc_mjysr: np.ndarray,
    mask_bits: np.ndarray,
    records: Sequence[StepRecord],
    config: MipsCalibrateConfig,
    creator: str,
    version: int,
    fbcd_mjysr: np.ndarray | None = None,
    extra_history: Sequence[str] = (),
) -> BCDProducts:
    """Build the HDULists of one DCE (names via `mips.bcd_name`)."""
    aorkey = int(raw_header["AORKEY"])
    expid = int(raw_header["EXPID"])
    dcenum = int(raw_header["DCENUM"])
    mkind = mask_kind(channel)
    kinds = ["bcd", "bunc", mkind] + (["fbcd"] if fbcd_mjysr is not None else [])
    names = {k: mips.bcd_name(channel, aorkey, expid, dcenum, version, k) for k in kinds}

    def hdul(kind: str, data: np.ndarray) -> fits.HDUList:
        hdr = product_header(
            raw_header,
            channel=channel,
            kind=kind,
            name=names[kind],
            records=records,
            config=config,
            creator=creator,
            extra_history=extra_history,
        )
        return fits.HDUList([fits.PrimaryHDU(data=data, header=hdr)])

    # bit 15 (SIGN) is never set, so int16 holds every bit without BZERO scaling
    mask16 = (np.asarray(mask_bits, dtype=np.int64) & 0x7FFF).astype(np.int16)
    return BCDProducts(
        channel=channel,
        aorkey=aorkey,
        expid=expid,
        dcenum=dcenum,
        bcd=hdul("bcd", np.asarray(bcd_mjysr, dtype=np.float32)),
        bunc=hdul("bunc", np.asarray(unc_mjysr, dtype=np.float32)),
        mask=hdul(mkind, mask16),
        fbcd=None if fbcd_mjysr is None else hdul("fbcd", np.asarray(fbcd_mjysr, dtype=np.float32)),
        names=names,
    )
