"""Decode one MIPS DCE from its CCSDS packets into the Spitzer raw product."""

from __future__ import annotations

from astropy.io import fits

from services.decode.mips.telemetry import parse_dce, raw_hdulist
from shared.instruments import mips


def decode_dce(chunk: bytes) -> fits.HDUList:
    """The Spitzer raw product of one DCE from its packets (as cut by ingest).

    `chunk` is the DCE header packet followed by the DCE's array packets. Returns one primary
    HDU, BUNIT='DN':

    - 24 um: int32 cube (2, 128, 128): plane 0 the on-board slope (stored = DN per sample x
      SLPSCALE), plane 1 the first difference sample1 - sample0 (DN);
    - Ge (70, 160 um): int32 cube (NSAMPLES, NROWS, NCOLS) of ramp samples (DN).

    The header carries TELESCOP, INSTRUME, CHNLNUM, AORKEY, EXPID, DCENUM, AOT_TYPE, EXPTIME
    (s), NSAMPLES, DATE_OBS, MJD_OBS, SCLK_OBS (s), RA_REF/DEC_REF/PA_REF (deg, commanded
    array centre), SATLEVEL (DN), STIMFLSH (Ge), NDCEGRP, SLPSCALE (24 um).

    Raises `MipsTelemetryError` (a ValueError) when a packet is corrupt or missing.
    """
    desc, cube = parse_dce(chunk)
    return raw_hdulist(desc, cube)


def raw_product_name(header: fits.Header, version: int = 1) -> str:
    """Spitzer name of a raw product, e.g. `SPITZER_M1_12345678_0004_0002_1_raw.fits`."""
    return mips.bcd_name(
        int(header["CHNLNUM"]),
        int(header["AORKEY"]),
        int(header["EXPID"]),
        int(header["DCENUM"]),
        version,
        "raw",
    )
