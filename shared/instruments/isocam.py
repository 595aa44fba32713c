"""ISOCAM (LW channel): TDF buffer/block layout, time keys, array, lenses, filters, products.

The one place where the ISOCAM telemetry format and instrument facts live (documented in
`docs/isocam-tdf.md`): the simulator encodes with these constants and helpers, the ingest,
decode and calibration steps decode with the same ones. The ISO Handbook gives the buffer size
and cadence, the time keys (UTK, ITK, TREF*, CAMITK0/CAMUTK0), the array, lenses, gains,
product names and the FITS layout (empty primary + one BINTABLE, 1024-element image vectors).
The byte layout of buffers and blocks, the checksum, the EOH table layout, and every
calibration value (dark, flat, transient, flux conversion, PSF) are OURS (assumed) and are
parameters of the functions that use them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.time import Time, TimeDelta
from astropy.wcs import WCS
from numpy.typing import NDArray

TELESCOP = "ISO"
INSTRUME = "CAM"
DETECTOR = "LW"

# --------------------------------------------------------------------------------------------
# Telemetry: 8192-byte buffers every 2 s, one TDF per revolution
# --------------------------------------------------------------------------------------------
BUFFER_BYTES = 8192
BUFFER_PERIOD_S = 2.0
HEADER_BYTES = 32
PAYLOAD_BYTES = BUFFER_BYTES - HEADER_BYTES
#: Buffer sync word (CCSDS attached sync marker, reused) and instrument ident.
SYNC = bytes.fromhex("1ACFFC1D")
IDENT = b"ICAM"

#: Buffer header (big-endian). CHECKSUM = sum of all big-endian 32-bit words of the buffer
#: with the CHECKSUM field set to zero, modulo 2**32 (ours: vectorisable over buffers).
BUFFER_HEADER = np.dtype([
    ("sync", "S4"), ("ident", "S4"), ("revolution", ">u2"), ("nbytes", ">u2"),
    ("bufcount", ">u4"), ("utk", ">u4"), ("checksum", ">u4"), ("spare", "S8"),
])
CHECKSUM_WORD = 5  #: index of the CHECKSUM field among the buffer's 32-bit words

#: Block identifiers; a zero identifier ends the blocks of a buffer (padding follows).
F1_ID = 0xF1F1
F2_ID = 0xF2F2
#: F1 housekeeping block: sampled at the buffer's UTK (start of the 2 s slot).
F1_BLOCK = np.dtype([
    ("block_id", ">u2"), ("block_len", ">u2"),
    ("itk", ">u4"),  #: full instrument time key at the buffer's UTK
    ("bootti", ">u4"),  #: the F2BOOTTI counter at the same instant
    ("det_temp_mk", ">u2"),  #: LW detector temperature (mK)
    ("lens_pos", ">u1"), ("filter_pos", ">u1"),
    ("spare", "S16"),
])
#: F2 imaging block: one per RESET or EOI readout of the 32x32 LW array.
F2_HEADER = np.dtype([
    ("block_id", ">u2"), ("block_len", ">u2"),
    ("bootti", ">u4"),  #: F2BOOTTI: ITK units since the counter reset; ITK = CAMITK0 + F2BOOTTI
    ("readcnt", ">u4"),  #: readout counter since the counter reset
    ("kind", ">u1"),  #: ReadoutKind
    ("gain", ">u1"),  #: 1, 2 or 4
    ("tint_itk", ">u2"),  #: integration time in ITK units
    ("lens_das", ">u2"),  #: pixel field of view in deci-arcsec (15, 30, 60, 120)
    ("filter", "S6"),  #: filter name, e.g. b"LW2"
    ("ra_deg", ">f8"), ("dec_deg", ">f8"),  #: pointing of the array centre
    ("roll_deg", ">f4"),  #: CROTA2 of the array image (deg)
    ("spare", "S12"),
])
NPIX_SIDE = 32
NPIX = NPIX_SIDE * NPIX_SIDE
F2_BLOCK = np.dtype([*F2_HEADER.descr, ("array", ">i2", (NPIX,))])
#: Blocks never span buffers: a buffer holds at most this many F2 blocks after its F1 block.
MAX_F2_PER_BUFFER = (PAYLOAD_BYTES - F1_BLOCK.itemsize) // F2_BLOCK.itemsize


class ReadoutKind(enum.IntEnum):
    """F2 readout kind: double sampling sends the RESET and the end-of-integration frames."""

    RESET = 0
    EOI = 1


READOUT_NAMES = {ReadoutKind.RESET: "RESET", ReadoutKind.EOI: "EOI"}
GAINS = (1, 2, 4)
ADU_MAX = 32767  #: int16 full scale: a readout at this value is saturated

# --------------------------------------------------------------------------------------------
# Time keys
# --------------------------------------------------------------------------------------------
UTK_PER_S = 24  #: UTK counts 1/24 s ...
UTK_EPOCH_UTC = "1995-11-01T00:00:00"  #: ... since this UTC instant (Handbook)
TREFUTC_EPOCH_UTC = "1989-01-01T00:00:00"  #: TREFUTC1 counts whole seconds since this
TREFUTC2_PER_S = 10_000_000  #: TREFUTC2 unit: 1e-7 s (ASSUMED: the Handbook says "fraction")
ITK_UNIT_S = 0.1399995  #: ITK unit length (s), Handbook example TREFITKU
UTK_PER_BUFFER = int(BUFFER_PERIOD_S * UTK_PER_S)


def utk_to_utc(utk: float) -> tuple[int, int]:
    """UTK -> (TREFUTC1 whole UTC seconds since 1989-01-01, TREFUTC2 fraction in 1e-7 s).

    Elapsed seconds are counted on the TAI scale (leap seconds included), an assumption.
    """
    t = Time(UTK_EPOCH_UTC, scale="utc") + TimeDelta(utk / UTK_PER_S, format="sec")
    dt = (t - Time(TREFUTC_EPOCH_UTC, scale="utc")).to_value("s")
    whole = int(np.floor(dt))
    return whole, round((dt - whole) * TREFUTC2_PER_S) % TREFUTC2_PER_S


def utk_to_isot(utk: float) -> str:
    """UTK -> ISO 8601 UTC string (ms)."""
    t = Time(UTK_EPOCH_UTC, scale="utc") + TimeDelta(utk / UTK_PER_S, format="sec")
    return str(t.utc.isot)


@dataclass(frozen=True, slots=True)
class TimeSync:
    """ITK <-> UTK synchronisation (TREF* keywords of an observation's raw data files)."""

    trefutk: int  #: UTK at the reference instant
    trefitk: float  #: ITK at the reference instant (fractional: rounded when written)
    trefitku_s: float  #: ITK unit length (s)

    def itk_to_utk(self, itk: NDArray[np.floating] | float) -> NDArray[np.float64]:
        """ITK -> UTK (1/24 s units, fractional)."""
        dt_s = (np.asarray(itk, dtype=np.float64) - self.trefitk) * self.trefitku_s
        return self.trefutk + dt_s * UTK_PER_S

    def utk_to_itk(self, utk: NDArray[np.floating] | float) -> NDArray[np.float64]:
        dt_s = (np.asarray(utk, dtype=np.float64) - self.trefutk) / UTK_PER_S
        return self.trefitk + dt_s / self.trefitku_s

    def header_cards(self) -> list[tuple[str, object, str]]:
        """The TREF* keywords (Handbook names and comments)."""
        utc1, utc2 = utk_to_utc(self.trefutk)
        return [
            ("TREFUTC1", utc1, "UTC (whole seconds since 01-01-1989)"),
            ("TREFUTC2", utc2, "UTC (remaining fraction of second, 1e-7 s)"),
            ("TREFUTK", int(self.trefutk), "ISO Uniform Time Key (UTK)"),
            ("TREFITK", round(self.trefitk), "ISO INSTRUMENT Time Key (ITK)"),
            ("TREFITKU", float(self.trefitku_s), "ITK unit length in seconds"),
        ]

    @classmethod
    def from_header(cls, h: fits.Header) -> TimeSync:
        return cls(int(h["TREFUTK"]), float(h["TREFITK"]), float(h["TREFITKU"]))


# --------------------------------------------------------------------------------------------
# Array, lenses, filters and (assumed) calibration references
# --------------------------------------------------------------------------------------------
DEAD_COLUMN = 24  #: LW column 24 (0-based column index, x) is dead
LENSES_ARCSEC = (1.5, 3.0, 6.0, 12.0)  #: pixel field of view per lens
#: Array centre in 0-based pixel coordinates (FITS CRPIX = 16.5).
CENTER_PX = (NPIX_SIDE - 1) / 2.0
TELESCOPE_DIAMETER_M = 0.6
JITTER_FWHM_ARCSEC = 1.5  #: pointing jitter + optics blur added in quadrature (ASSUMED)


@dataclass(frozen=True, slots=True)
class Filter:
    """An LW filter and its (assumed) point-source flux conversion."""

    name: str
    wavelength_um: float
    #: ADU/G/s per mJy of a point source summed over the array, 6" lens (ASSUMED, ~Handbook)
    adug_s_per_mjy: float
    background_adug_s: float  #: zodiacal background per 6" pixel (ASSUMED, simulator default)


FILTERS: dict[str, Filter] = {
    "LW2": Filter("LW2", 6.7, 2.32, 30.0),
    "LW3": Filter("LW3", 14.3, 1.96, 80.0),
}


def flux_conversion(filter_name: str, lens_arcsec: float) -> float:
    """ADU/G/s per Jy for a point source (ASSUMED independent of the lens)."""
    if lens_arcsec not in LENSES_ARCSEC:
        raise ValueError(f"lens {lens_arcsec}\" is not one of {LENSES_ARCSEC}")
    try:
        return FILTERS[filter_name].adug_s_per_mjy * 1000.0
    except KeyError:
        raise ValueError(f"unknown LW filter {filter_name!r}; known {sorted(FILTERS)}") from None


def psf_fwhm_arcsec(filter_name: str) -> float:
    """Gaussian PSF FWHM (arcsec): diffraction 1.03 lambda/D with jitter in quadrature."""
    diff = 1.03 * FILTERS[filter_name].wavelength_um * 1e-6 / TELESCOPE_DIAMETER_M * 206264.806
    return float(np.hypot(diff, JITTER_FWHM_ARCSEC))


def _pixel_grid() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    y, x = np.mgrid[0:NPIX_SIDE, 0:NPIX_SIDE].astype(np.float64)
    return (x - CENTER_PX) / CENTER_PX, (y - CENTER_PX) / CENTER_PX


def dark_model(*, det_temp_mk: float = 3000.0) -> NDArray[np.float64]:
    """Dark current (ADU/G/s) per pixel, (32, 32); smooth pattern, ASSUMED reference file."""
    u, v = _pixel_grid()
    scale = 1.0 + 0.002 * (det_temp_mk - 3000.0)
    return (1.5 + 0.4 * u + 0.3 * v * v + 0.2 * np.cos(3.0 * u * v)) * scale


def flat_model() -> NDArray[np.float64]:
    """Relative response per pixel (detector x optical flat), mean 1 (ASSUMED reference)."""
    u, v = _pixel_grid()
    optical = 1.0 - 0.12 * (u * u + v * v)
    detector = 1.0 + 0.04 * np.sin(7.0 * u + 1.0) * np.cos(5.0 * v)
    flat = optical * detector
    flat[:, DEAD_COLUMN] = 1.0
    return flat / flat.mean()


@dataclass(frozen=True, slots=True)
class TransientModel:
    """Simple detector memory: a fraction of the photocurrent follows the sky with a lag.

    measured(t) = (1 - fraction) S(t) + fraction L(t),   dL/dt = (S - L) / tau_s
    (ASSUMED stand-in for the Fouks-Schubert model; the same model simulates and corrects.)
    """

    fraction: float = 0.3
    tau_s: float = 5.0


TRANSIENT = TransientModel()
DET_TEMP_MK = 3000  #: nominal LW detector temperature written to F1 (mK)


def array_wcs(ra_deg: float, dec_deg: float, roll_deg: float, lens_arcsec: float) -> WCS:
    """TAN WCS of the 32x32 array for one pointing (0-based pixel (15.5, 15.5) = centre).

    Roll is the FITS (AIPS) CROTA2 of the array image; at roll 0 +Y points north and +X west
    (RA decreases with x).
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [CENTER_PX + 1.0, CENTER_PX + 1.0]
    w.wcs.cdelt = [-lens_arcsec / 3600.0, lens_arcsec / 3600.0]
    c, s = np.cos(np.radians(roll_deg)), np.sin(np.radians(roll_deg))
    # AIPS CROTA2 = roll expressed as a PC matrix (CDELT1 = -CDELT2).
    w.wcs.pc = [[c, s], [-s, c]]
    w.wcs.radesys = "ICRS"
    return w


# --------------------------------------------------------------------------------------------
# Observation numbers and products
# --------------------------------------------------------------------------------------------
PRODUCT_ROOTS = {
    "CTDF": "TDF slice of one observation (ours, internal: TDF_First_Scan output)",
    "CIER": "edited raw data (Derive_ERD)",
    "CISP": "standard processed data: EOI-RESET pairs (Derive_SPD)",
    "CGLL": "glitch list",
    "CCIM": "calibrated rate images per pointing",
    "CMAP": "flux maps per pointing (Jy)",
    "CMOS": "raster mosaic (Jy)",
    "CPSL": "point-source list",
    "EOHC": "continuous EOH: observation boundaries of one revolution",
}


def obs_number(revolution: int, sequence: int) -> str:
    """8-digit observation number: revolution (3 digits) + sequence in the revolution (5)."""
    if not (0 <= revolution <= 999 and 0 <= sequence <= 99999):
        raise ValueError(f"revolution {revolution} / sequence {sequence} out of range")
    return f"{revolution:03d}{sequence:05d}"


def product_name(root: str, number: str) -> str:
    """Product file name: root + 8-digit observation number (or 3-digit revolution)."""
    if root not in PRODUCT_ROOTS:
        raise ValueError(f"unknown ISOCAM product root {root!r}")
    if not (number.isdigit() and len(number) in (3, 8)):
        raise ValueError(f"{number!r} is neither an 8-digit observation nor a 3-digit revolution")
    return f"{root}{number}"


def product_dir(obsnum: str, version: int) -> str:
    """Store folder of an observation's products: `rev<rev>/<obsnum>/v<version>`. ISO names
    carry no processing version, so the folder does (keys stay unique per version)."""
    product_name("CTDF", obsnum)  # validates the 8-digit observation number
    return f"rev{obsnum[:3]}/{obsnum}/v{version}"


class Problem:
    """A counted, reported defect of the input: what, how many, where (first buffer indices)."""

    __slots__ = ("count", "first_buffers", "obsnum", "reason")

    def __init__(self, reason: str, count: int, first_buffers: tuple[int, ...] = (),
                 obsnum: str | None = None) -> None:
        self.reason, self.count = reason, count
        self.first_buffers, self.obsnum = first_buffers, obsnum

    def __repr__(self) -> str:
        bufs = ", ".join(map(str, self.first_buffers))
        where = f" (buffers {bufs})" if self.first_buffers else ""
        obs = f" [obs {self.obsnum}]" if self.obsnum else ""
        return f"{self.reason}: {self.count}{obs}{where}"

    __str__ = __repr__


def buffer_checksum(buffers: NDArray[np.uint8]) -> NDArray[np.uint32]:
    """Checksum of each (n, 8192) buffer (the CHECKSUM field is excluded)."""
    words = np.ascontiguousarray(buffers).view(">u4").astype(np.uint64)
    total = words.sum(axis=1) - words[:, CHECKSUM_WORD]
    return (total & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def base_header(*, obsnum: str, revolution: int, root: str) -> fits.Header:
    """Keywords every ISOCAM product primary header starts with."""
    h = fits.Header()
    h["TELESCOP"] = (TELESCOP, "Infrared Space Observatory")
    h["INSTRUME"] = (INSTRUME, "ISOCAM")
    h["DETECTOR"] = (DETECTOR, "long-wave channel 4-17 um, 32x32")
    h["FILENAME"] = (product_name(root, obsnum), "product name: root + observation number")
    h["OBSNUM"] = (obsnum, "observation: revolution (3) + sequence (5)")
    h["REVOLUTN"] = (revolution, "ISO revolution")
    return h


#: Primary-header keywords carried from product to product.
CARRIED = ("OBSNUM", "REVOLUTN", "CAMITK0", "CAMUTK0", "TREFUTC1", "TREFUTC2", "TREFUTK",
           "TREFITK", "TREFITKU", "UTKSTART", "UTKEND", "DATE-OBS", "DATE-END", "FILTER",
           "LENS", "GAIN", "TINT", "OBJECT", "AOT")


def carry(header: fits.Header, *, root: str) -> fits.Header:
    """New primary header for product `root`, carrying the observation keywords of `header`."""
    h = base_header(obsnum=str(header["OBSNUM"]), revolution=int(header["REVOLUTN"]), root=root)
    for k in CARRIED:
        if k in header and k not in h:
            h[k] = (header[k], header.comments[k])
    return h


def table_product(primary: fits.Header, columns: list[fits.Column], *, root: str,
                  table_header: dict[str, tuple[object, str]] | None = None) -> fits.HDUList:
    """ISOCAM product: empty primary HDU with the header + one BINTABLE named `root`."""
    prim = fits.PrimaryHDU(header=primary)
    tab = fits.BinTableHDU.from_columns(columns, name=root)
    for k, (v, c) in (table_header or {}).items():
        tab.header[k] = (v, c)
    return fits.HDUList([prim, tab])


def column(hdul: fits.HDUList, name: str) -> NDArray:
    """A column of the product's BINTABLE as a native-endian numpy array."""
    a = np.asarray(hdul[1].data[name])
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.kind in "iuf" else a


@dataclass(frozen=True, slots=True)
class Blocks:
    """F1 and F2 blocks of a run of buffers, with the index of the buffer each came from."""

    f1: NDArray  #: F1_BLOCK records
    f1_buffer: NDArray[np.intp]
    f2: NDArray  #: F2_BLOCK records
    f2_buffer: NDArray[np.intp]
    malformed_buffer: NDArray[np.intp]  #: buffers whose block chain broke (rest skipped)


def parse_blocks(buffers: NDArray[np.uint8]) -> Blocks:
    """Walk the block chains of (n, 8192) checked buffers, all buffers at once.

    One numpy step per block position (a buffer holds <= 1 + MAX_F2_PER_BUFFER blocks), never a
    loop over buffers. A chain breaks on an unknown identifier, a length that does not match the
    identifier, or a block running past NBYTES; the blocks before the break are kept.
    """
    buf = np.asarray(buffers, dtype=np.uint8).reshape(-1, BUFFER_BYTES)
    n = buf.shape[0]
    hdr = np.ascontiguousarray(buf[:, :HEADER_BYTES]).view(BUFFER_HEADER).ravel()
    end = HEADER_BYTES + np.minimum(hdr["nbytes"].astype(np.int64), PAYLOAD_BYTES)
    cur = np.full(n, HEADER_BYTES, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    broken = np.zeros(n, dtype=bool)
    f1_parts: list[NDArray] = []
    f1_idx: list[NDArray] = []
    f2_parts: list[NDArray] = []
    f2_idx: list[NDArray] = []
    rows = np.arange(n)
    for _ in range(1 + MAX_F2_PER_BUFFER + 1):
        alive &= cur + 4 <= end
        if not alive.any():
            break
        r = rows[alive]
        c = cur[alive]
        bid = (buf[r, c].astype(np.int64) << 8) | buf[r, c + 1]
        blen = (buf[r, c + 2].astype(np.int64) << 8) | buf[r, c + 3]
        is1 = (bid == F1_ID) & (blen == F1_BLOCK.itemsize)
        is2 = (bid == F2_ID) & (blen == F2_BLOCK.itemsize)
        stop = bid == 0  # padding: the chain ends cleanly
        fits_in = c + blen <= end[r]
        bad = ~stop & ~((is1 | is2) & fits_in)
        broken[r[bad]] = True
        for sel, dtype, parts, idx in ((is1 & fits_in, F1_BLOCK, f1_parts, f1_idx),
                                       (is2 & fits_in, F2_BLOCK, f2_parts, f2_idx)):
            if sel.any():
                rr, cc = r[sel], c[sel]
                raw = buf[rr[:, None], cc[:, None] + np.arange(dtype.itemsize)[None, :]]
                parts.append(np.ascontiguousarray(raw).view(dtype).ravel())
                idx.append(rr)
        ok = (is1 | is2) & fits_in
        cur[r[ok]] += blen[ok]
        alive[r[~ok]] = False
    f1 = np.concatenate(f1_parts) if f1_parts else np.zeros(0, F1_BLOCK)
    f2 = np.concatenate(f2_parts) if f2_parts else np.zeros(0, F2_BLOCK)
    i1 = np.concatenate(f1_idx) if f1_idx else np.zeros(0, np.intp)
    i2 = np.concatenate(f2_idx) if f2_idx else np.zeros(0, np.intp)
    o1, o2 = np.argsort(i1, kind="stable"), np.argsort(i2, kind="stable")
    # Within a buffer blocks were found in chain order; a stable sort keeps it.
    return Blocks(f1[o1], i1[o1], f2[o2], i2[o2], np.nonzero(broken)[0])
