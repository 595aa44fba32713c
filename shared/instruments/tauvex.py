"""TAUVEX: Level 0 bit layout, telescopes and filters, detector geometry and reference calibration.

The one place where the TAUVEX Level 0 format and instrument facts live (documented in
`docs/tauvex-level0.md`): the simulator encodes with these constants and helpers, the ingest and
decode services decode with the same ones. The event/time segment layouts were never published;
the layout below is ours. Values not confirmed by the mission documents (filter conversion
factors, PSF, flat and distortion models, clock epoch) are marked as assumed and are parameters
of the functions that use them.
"""

from __future__ import annotations

import datetime
import enum
import io
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

TELESCOP = "TAUVEX"

# --------------------------------------------------------------------------------------------
# Level 0 major frame
# --------------------------------------------------------------------------------------------
#: Downlink bit rate (bit/s).
DOWNLINK_BIT_S = 1_000_000
#: Major frame: 64-bit sync word + 24 segments ("minor frames") of 40 bits = 1024 bits.
FRAME_BYTES = 128
SYNC_BYTES = 8
SEGMENT_BYTES = 5
SEGMENTS_PER_FRAME = 24
SYNC_WORD = bytes.fromhex("B0952827C7764703")
#: Sync word as a big-endian integer (compare against an '>u8' view of the first 8 bytes).
SYNC_WORD_U64 = int.from_bytes(SYNC_WORD, "big")
#: Major frames per second at the downlink rate (976.5625).
FRAMES_PER_S = DOWNLINK_BIT_S / (FRAME_BYTES * 8)
#: Frames whose sync word differs from SYNC_WORD in at most this many bits are accepted (counted).
SYNC_MAX_BIT_ERRORS = 3
#: An observation starts with at least this many all-filler major frames.
MIN_LEADING_FILLER_FRAMES = 195

#: 40-bit segment value that fills an empty slot (bytes A8 AA AA AA AA).
FILLER_SEGMENT = 0xA8AAAAAAAA
FILLER_SEGMENT_BYTES = bytes.fromhex("A8AAAAAAAA")

# A segment is 40 bits, transmitted most significant byte first. Bit 39 is the first bit on the
# link, bit 0 the last. The two last bits (1..0) give the segment kind, by analogy with LOG
# segments, which the mission documents say end in bits `10`.
SEGMENT_BITS = 40
SEGMENT_MASK = (1 << SEGMENT_BITS) - 1
TYPE_MASK = 0b11


class SegmentType(enum.IntEnum):
    """Segment kind, in bits 1..0 of a 40-bit segment."""

    EVENT = 0b00  #: one photon event: telescope, W, S, Z charges
    TIME = 0b01  #: coarse clock tick: 38-bit millisecond counter
    LOG = 0b10  #: system log (START LOG, END LOG, filler/padding)
    RESERVED = 0b11  #: never sent: a segment of this kind is broken


# EVENT: bits 39..38 telescope id (1..3; 0 = broken), 37..26 W, 25..14 S, 13..2 Z (12 bits each).
EVENT_TELE_SHIFT = 38
EVENT_TELE_MASK = 0b11
EVENT_W_SHIFT = 26
EVENT_S_SHIFT = 14
EVENT_Z_SHIFT = 2
CHARGE_BITS = 12
CHARGE_MASK = (1 << CHARGE_BITS) - 1
#: ADC full scale: a charge at this value is saturated.
CHARGE_MAX = CHARGE_MASK

# TIME: bits 39..2 spacecraft clock in ms (38 bits: 8.7 years before wrap).
TIME_SHIFT = 2
TIME_BITS = 38
TIME_MASK = (1 << TIME_BITS) - 1

# LOG: bits 39..32 log code, 31..2 payload (30 bits), 1..0 = 10.
LOG_CODE_SHIFT = 32
LOG_CODE_MASK = 0xFF
LOG_PAYLOAD_SHIFT = 2
LOG_PAYLOAD_BITS = 30
LOG_PAYLOAD_MASK = (1 << LOG_PAYLOAD_BITS) - 1


class LogCode(enum.IntEnum):
    """Code of a LOG segment (bits 39..32)."""

    START = 0x01  #: START LOG: an observation begins; payload = observation id
    END = 0x02  #: END LOG: the observation ends; payload = observation id
    FILL = 0xA8  #: the filler segment itself (pads the last data frame of an observation)


#: Lookup table over the first byte of a LOG segment: True for a known `LogCode`.
LOG_CODE_KNOWN: NDArray[np.bool_] = np.isin(np.arange(256), [int(c) for c in LogCode])


def event_segment(
    tele: NDArray[np.integer],
    w: NDArray[np.integer],
    s: NDArray[np.integer],
    z: NDArray[np.integer],
) -> NDArray[np.uint64]:
    """Pack photon events into 40-bit EVENT segments (uint64 values)."""
    t = np.asarray(tele, dtype=np.uint64) & np.uint64(EVENT_TELE_MASK)
    cm = np.uint64(CHARGE_MASK)
    return (
        (t << np.uint64(EVENT_TELE_SHIFT))
        | ((np.asarray(w, dtype=np.uint64) & cm) << np.uint64(EVENT_W_SHIFT))
        | ((np.asarray(s, dtype=np.uint64) & cm) << np.uint64(EVENT_S_SHIFT))
        | ((np.asarray(z, dtype=np.uint64) & cm) << np.uint64(EVENT_Z_SHIFT))
        | np.uint64(SegmentType.EVENT)
    )


def time_segment(time_ms: NDArray[np.integer]) -> NDArray[np.uint64]:
    """Pack spacecraft clock values (ms) into 40-bit TIME segments."""
    t = np.asarray(time_ms, dtype=np.uint64) & np.uint64(TIME_MASK)
    return (t << np.uint64(TIME_SHIFT)) | np.uint64(SegmentType.TIME)


def log_segment(code: LogCode, payload: int) -> int:
    """One 40-bit LOG segment."""
    return (
        (int(code) << LOG_CODE_SHIFT)
        | ((payload & LOG_PAYLOAD_MASK) << LOG_PAYLOAD_SHIFT)
        | int(SegmentType.LOG)
    )


def segments_to_bytes(segments: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """40-bit segment values -> (n, 5) bytes, most significant byte first."""
    seg = np.asarray(segments, dtype=np.uint64)
    # '>u8' puts the most significant byte first; the 40-bit value sits in the last 5 bytes.
    return seg.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 3:]


def _frames_buffer(frames: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(n, 128) C-contiguous uint8 frames (a view when they already are)."""
    return np.ascontiguousarray(frames, dtype=np.uint8).reshape(-1, FRAME_BYTES)


def segment_words(frames: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """(n, 128) major frames -> (n, 24) '>u8' view (no copy): segment k is the low 40 bits.

    Word k starts 3 bytes before segment k, so its 3 high bytes belong to the previous segment
    (or the sync word): shift and mask before use (`segments_from_frames` masks them off).
    """
    fr = _frames_buffer(frames)
    n = fr.shape[0]
    if n == 0:
        return np.zeros((0, SEGMENTS_PER_FRAME), dtype=">u8")
    return np.ndarray((n, SEGMENTS_PER_FRAME), dtype=">u8", buffer=fr,
                      offset=SYNC_BYTES + SEGMENT_BYTES - 8,
                      strides=(FRAME_BYTES, SEGMENT_BYTES))


def segment_bytes(frames: NDArray[np.uint8], byte: int) -> NDArray[np.uint8]:
    """(n, 24) uint8 view (no copy) of byte `byte` (0 = first, bits 39..32; 4 = bits 7..0)."""
    fr = _frames_buffer(frames)
    return fr[:, SYNC_BYTES + byte::SEGMENT_BYTES]


def segments_from_frames(frames: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """(n, 128) major frames -> (n, 24) uint64 segment values (vectorised shifts, no loops).

    One masked read of the strided '>u8' view of `segment_words` (one pass, no padding copy).
    """
    return np.bitwise_and(segment_words(frames), np.uint64(SEGMENT_MASK), dtype=np.uint64)


def frames_from_segments(segments: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """(n, 24) segment values -> (n, 128) major frames with the sync word."""
    seg = np.asarray(segments, dtype=np.uint64).reshape(-1, SEGMENTS_PER_FRAME)
    n = seg.shape[0]
    out = np.empty((n, FRAME_BYTES), dtype=np.uint8)
    out[:, :SYNC_BYTES] = np.frombuffer(SYNC_WORD, dtype=np.uint8)
    out[:, SYNC_BYTES:] = segments_to_bytes(seg.ravel()).reshape(n, -1)
    return out


FILLER_FRAME: NDArray[np.uint8] = frames_from_segments(
    np.full((1, SEGMENTS_PER_FRAME), FILLER_SEGMENT, dtype=np.uint64)
)[0]

# --------------------------------------------------------------------------------------------
# Telescopes, filters, detector
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """A TAUVEX filter band and its (assumed) flux calibration."""

    name: str
    wavelength_a: float  #: effective wavelength (Angstrom)
    ujy_per_cps: float  #: flux density (uJy) giving 1 count/s; ASSUMED, not from the mission


@dataclass(frozen=True, slots=True)
class Telescope:
    """One of the three co-aligned 20 cm telescopes and its filter for the simulated scans."""

    number: int  #: TELE_NUM: 1, 2, 3
    filter: Filter
    #: boresight offset from the spacecraft pointing (arcsec, east and north); ASSUMED
    boresight_offset_arcsec: tuple[float, float]


FILTERS: dict[str, Filter] = {
    "SF1": Filter("SF1", 1750.0, 250.0),
    "SF2": Filter("SF2", 2200.0, 180.0),
    "SF3": Filter("SF3", 2600.0, 210.0),
}
TELESCOPES: dict[int, Telescope] = {
    1: Telescope(1, FILTERS["SF1"], (0.0, 0.0)),
    2: Telescope(2, FILTERS["SF2"], (40.0, -25.0)),
    3: Telescope(3, FILTERS["SF3"], (-30.0, 20.0)),
}

#: Detector pixel grid used for X, Y (pixels 0..1024 along each axis, centre at 512).
DETECTOR_NPIX = 1024
DETECTOR_CENTER_PX = DETECTOR_NPIX / 2.0
#: Plate scale (arcsec per detector pixel): 1024 px x 3.2" = 0.91 deg.
PLATE_SCALE_ARCSEC = 3.2
#: Field of view diameter (deg); the detector is read inside this circle only.
FIELD_DIAMETER_DEG = 0.9
FIELD_RADIUS_PX = FIELD_DIAMETER_DEG * 3600.0 / 2.0 / PLATE_SCALE_ARCSEC
#: Total PSF FWHM (optics + wedge-strip-zigzag position noise), ASSUMED (~10" class).
PSF_FWHM_ARCSEC = 10.0
#: Optical part of the PSF (Gaussian FWHM); the rest comes from charge noise.
OPTICS_FWHM_ARCSEC = 7.0

# Wedge-strip-zigzag charge division: Qw/Q = WSZ_OFFSET + WSZ_SLOPE * X/NPIX, likewise Qs with Y.
WSZ_OFFSET = 0.1
WSZ_SLOPE = 0.4
#: Valid total charge window W+S+Z (ADC counts); outside it the event is not a photon.
CHARGE_WINDOW = (1200, 6500)

#: Spacecraft clock epoch (ms counter 0). ASSUMED.
CLOCK_EPOCH_UTC = "2008-01-01T00:00:00"


class ValidityBit(enum.IntFlag):
    """VALIDITY column bits (0 = valid photon event)."""

    CHARGE_LOW = 1  #: W+S+Z below CHARGE_WINDOW
    CHARGE_HIGH = 2  #: W+S+Z above CHARGE_WINDOW
    SATURATED = 4  #: one of W, S, Z at ADC full scale
    OUTSIDE_FIELD = 8  #: X, Y outside the field circle (set by CALC_XY)
    NO_ATTITUDE = 16  #: event time outside the attitude table (set by CALC_RA)


#: Version of each pipeline module; each product header carries the keyword of every module
#: that touched it.
MODULE_VERSIONS: dict[str, str] = {
    "CRT_LV1A": "1.0",
    "VALIDATE": "1.0",
    "CALC_XY": "1.0",
    "GET_CAL": "1.0",
    "APPL_CAL": "1.0",
    "FLAT_FLD": "1.0",
    "GEO_CORR": "1.0",
    "CALC_RA": "1.0",
    "REGISTER": "1.0",
    "CRT_IMG": "1.0",
    "EXT_PS": "1.0",
}


# --------------------------------------------------------------------------------------------
# Reference calibration (the "calibration files"): flat field and geometric distortion models
# --------------------------------------------------------------------------------------------
#: Radial distortion coefficient: shift (px) = K * r^3 / R^2 along the radius; ASSUMED.
DISTORTION_K_PX = 8.0
#: Constant tilt term of the distortion (px per px); ASSUMED.
DISTORTION_SHEAR = 0.004


def flat_field(x_px: NDArray[np.floating], y_px: NDArray[np.floating]) -> NDArray[np.float64]:
    """Relative detector response (<= 1) at detector position X, Y (px): vignetting + ripple."""
    dx = (np.asarray(x_px) - DETECTOR_CENTER_PX) / FIELD_RADIUS_PX
    dy = (np.asarray(y_px) - DETECTOR_CENTER_PX) / FIELD_RADIUS_PX
    r2 = dx * dx + dy * dy
    ripple = (
        0.03
        * np.sin(2.0 * np.pi * np.asarray(x_px) / 300.0)
        * np.cos(2.0 * np.pi * np.asarray(y_px) / 420.0)
    )
    return np.asarray(0.95 - 0.15 * r2 + ripple, dtype=np.float64)


def distortion(
    x_px: NDArray[np.floating], y_px: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Detector position (px) where a photon focused at ideal focal-plane position x, y lands."""
    dx = np.asarray(x_px, dtype=np.float64) - DETECTOR_CENTER_PX
    dy = np.asarray(y_px, dtype=np.float64) - DETECTOR_CENTER_PX
    r2 = (dx * dx + dy * dy) / FIELD_RADIUS_PX**2
    scale = DISTORTION_K_PX * r2 / FIELD_RADIUS_PX
    return (
        DETECTOR_CENTER_PX + dx + dx * scale + DISTORTION_SHEAR * dy,
        DETECTOR_CENTER_PX + dy + dy * scale,
    )


# --------------------------------------------------------------------------------------------
# Sky <-> focal plane (gnomonic projection about a telescope boresight)
# --------------------------------------------------------------------------------------------


def sky_to_focal(
    ra_deg: NDArray[np.floating],
    dec_deg: NDArray[np.floating],
    ra0_deg: NDArray[np.floating],
    dec0_deg: NDArray[np.floating],
    roll_deg: NDArray[np.floating] | float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Sky position -> ideal focal-plane X, Y (px) for a boresight RA0/Dec0 and roll (deg).

    Roll is the position angle (east of north) of the detector +Y axis; +X points east at
    roll 0 (sky seen from inside the sphere: X grows with RA).
    """
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    ra0, dec0 = np.radians(ra0_deg), np.radians(dec0_deg)
    cosc = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    xi = np.cos(dec) * np.sin(ra - ra0) / cosc
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cosc
    roll = np.radians(roll_deg)
    scale = np.degrees(1.0) * 3600.0 / PLATE_SCALE_ARCSEC
    x = xi * np.cos(roll) - eta * np.sin(roll)
    y = xi * np.sin(roll) + eta * np.cos(roll)
    return DETECTOR_CENTER_PX + x * scale, DETECTOR_CENTER_PX + y * scale


def focal_to_sky(
    x_px: NDArray[np.floating],
    y_px: NDArray[np.floating],
    ra0_deg: NDArray[np.floating],
    dec0_deg: NDArray[np.floating],
    roll_deg: NDArray[np.floating] | float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Inverse of `sky_to_focal`: ideal focal-plane X, Y (px) -> RA, Dec (deg)."""
    scale = np.degrees(1.0) * 3600.0 / PLATE_SCALE_ARCSEC
    x = (np.asarray(x_px, dtype=np.float64) - DETECTOR_CENTER_PX) / scale
    y = (np.asarray(y_px, dtype=np.float64) - DETECTOR_CENTER_PX) / scale
    roll = np.radians(roll_deg)
    xi = x * np.cos(roll) + y * np.sin(roll)
    eta = -x * np.sin(roll) + y * np.cos(roll)
    ra0, dec0 = np.radians(ra0_deg), np.radians(dec0_deg)
    denom = np.cos(dec0) - eta * np.sin(dec0)
    ra = ra0 + np.arctan2(xi, denom)
    dec = np.arctan2(np.sin(dec0) + eta * np.cos(dec0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def charge_to_xy(
    w: NDArray[np.integer], s: NDArray[np.integer], z: NDArray[np.integer]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Wedge-strip-zigzag charges -> detector X, Y (px): x ~ Qw/(Qw+Qs+Qz), y ~ Qs/(...)."""
    wf = np.asarray(w, dtype=np.float64)
    sf = np.asarray(s, dtype=np.float64)
    total = wf + sf + np.asarray(z, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(total > 0, 1.0 / total, np.nan)
    x = (wf * inv - WSZ_OFFSET) / WSZ_SLOPE * DETECTOR_NPIX
    y = (sf * inv - WSZ_OFFSET) / WSZ_SLOPE * DETECTOR_NPIX
    return x, y


def clock_to_isot(time_ms: float, epoch_utc: str = CLOCK_EPOCH_UTC) -> str:
    """Spacecraft clock (ms) -> ISO 8601 UTC string (for STARTOBS / ENDOBS).

    The clock counts SI milliseconds from the epoch; leap seconds are ignored (none between
    the assumed epoch and the mission's operations would change a header by more than 1 s).
    """
    epoch = datetime.datetime.fromisoformat(epoch_utc)
    t = epoch + datetime.timedelta(milliseconds=float(time_ms))
    return t.isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# Level 1 ("DVD"): one observation's data frames + attitude rows, stored as a FITS file:
# empty primary with the observation keywords, FRAMES BINTABLE (one 128-byte major frame per
# row, column FRAME '128B'), ATTITUDE BINTABLE (the spacecraft table's rows for the observation).
# --------------------------------------------------------------------------------------------


class Level1FormatError(ValueError):
    """Bytes given as a stored Level 1 observation are not one."""


@dataclass(frozen=True, slots=True)
class Problem:
    """A counted, reported defect of the input: what, how many, where (first frame indices)."""

    reason: str
    count: int
    first_frames: tuple[int, ...] = ()  #: up to 10 major-frame indices in the Level 0 stream
    obs_id: int | None = None

    def __str__(self) -> str:
        where = f" (frames {', '.join(map(str, self.first_frames))})" if self.first_frames else ""
        obs = f" [obs {self.obs_id}]" if self.obs_id is not None else ""
        return f"{self.reason}: {self.count}{obs}{where}"


@dataclass(slots=True)
class Level1Observation:
    """One observation of Level 1 data: its data major frames and its attitude rows."""

    obs_id: int
    frames: NDArray[np.uint8]  #: (n, 128) data major frames, filler removed, in downlink order
    attitude: Table  #: TIME (s, spacecraft clock), RA/DEC/ROLL_T1..T3 (deg), housekeeping
    start_ms: int  #: first TIME segment of the observation (spacecraft clock, ms)
    end_ms: int  #: last TIME segment
    problems: list[Problem] = field(default_factory=list)

    @property
    def nframes(self) -> int:
        return int(self.frames.shape[0])

    def to_bytes(self) -> bytes:
        """Serialise as a FITS file (see the module docstring)."""
        prim = fits.PrimaryHDU()
        h = prim.header
        h["TELESCOP"] = (TELESCOP, "mission")
        h["DATALEVL"] = ("1", "Level 1: filler removed, telemetry merged")
        h["OBS_ID"] = (self.obs_id, "observation id from START LOG")
        h["CLKSTART"] = (self.start_ms, "[ms] spacecraft clock of first TIME segment")
        h["CLKEND"] = (self.end_ms, "[ms] spacecraft clock of last TIME segment")
        h["STARTOBS"] = (clock_to_isot(self.start_ms), "UTC start of observation")
        h["ENDOBS"] = (clock_to_isot(self.end_ms), "UTC end of observation")
        h["NFRAMES"] = (self.nframes, "data major frames")
        for p in self.problems:
            h.add_comment(f"PROBLEM {p}"[:72])
        frames = fits.BinTableHDU.from_columns(
            [fits.Column(name="FRAME", format=f"{FRAME_BYTES}B", array=self.frames)],
            name="FRAMES",
        )
        att = fits.BinTableHDU(self.attitude, name="ATTITUDE")
        buf = io.BytesIO()
        fits.HDUList([prim, frames, att]).writeto(buf, checksum=True)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Level1Observation:
        """Inverse of `to_bytes`; problems are not restored (they were reported at ingest)."""
        try:
            with fits.open(io.BytesIO(data)) as hdul:
                h = hdul[0].header
                if h.get("TELESCOP") != TELESCOP or "FRAMES" not in hdul:
                    raise Level1FormatError("not a TAUVEX Level 1 observation (TELESCOP/FRAMES)")
                frames = np.array(hdul["FRAMES"].data["FRAME"], dtype=np.uint8)
                att = Table(hdul["ATTITUDE"].data)
                return cls(
                    int(h["OBS_ID"]),
                    frames.reshape(-1, FRAME_BYTES),
                    att,
                    int(h["CLKSTART"]),
                    int(h["CLKEND"]),
                )
        except (OSError, KeyError, TypeError) as exc:
            raise Level1FormatError(f"cannot read a TAUVEX Level 1 observation: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Level 1a..1g event tables: seed columns, in the seed's order, then TIME
# --------------------------------------------------------------------------------------------
_C1A = ("W", "S", "Z", "VALIDITY")
_C1C = (*_C1A, "X", "Y", "CALIB")
_C1E = (*_C1C, "GEOCORRX", "GEOCORRY")
_C1F = (*_C1E, "RA", "DEC", "GLON", "GLAT")
#: Columns of each Level 1 product (seed 004), before the extra TIME column.
LEVEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "1a": _C1A,
    "1b": (*_C1A, "X", "Y"),
    "1c": _C1C,
    "1d": _C1C,
    "1e": _C1E,
    "1f": _C1F,
    "1g": _C1F,
}
#: FITS format and unit of every event column.
COLUMN_FORMATS: dict[str, tuple[str, str | None]] = {
    "W": ("I", "adu"),
    "S": ("I", "adu"),
    "Z": ("I", "adu"),
    "VALIDITY": ("J", None),
    "X": ("E", "pixel"),
    "Y": ("E", "pixel"),
    "CALIB": ("E", None),
    "GEOCORRX": ("E", "pixel"),
    "GEOCORRY": ("E", "pixel"),
    "RA": ("D", "deg"),
    "DEC": ("D", "deg"),
    "GLON": ("D", "deg"),
    "GLAT": ("D", "deg"),
    "TIME": ("D", "s"),
}
_STRUCTURAL = (
    "XTENSION",
    "BITPIX",
    "NAXIS",
    "PCOUNT",
    "GCOUNT",
    "TFIELDS",
    "TTYPE",
    "TFORM",
    "TUNIT",
    "TNULL",
    "TSCAL",
    "TZERO",
    "TDIM",
    "EXTNAME",
    "CHECKSUM",
    "DATASUM",
    "TDISP",
)


def product_header(header: fits.Header) -> fits.Header:
    """Copy of a product header without structural/table keywords (to carry keywords on)."""
    out = fits.Header()
    for card in header.cards:
        key = card.keyword
        if key == "HISTORY":
            out.add_history(str(card.value))
        elif key == "COMMENT":
            out.add_comment(str(card.value))
        elif not key.startswith(_STRUCTURAL) and key:
            out[key] = (card.value, card.comment)
    return out


def event_table(level: str, columns: dict[str, NDArray], header: fits.Header) -> fits.HDUList:
    """Level 1a..1g product: empty primary + EVENTS BINTABLE with the level's seed columns.

    `columns` must hold every column of `LEVEL_COLUMNS[level]` and TIME (s, spacecraft clock).
    `header` keywords (TELESCOP, TELE_NUM, ..., module versions) go into the table header;
    NCOUNTS and DATALEVL are set here.
    """
    names = (*LEVEL_COLUMNS[level], "TIME")
    cols = [
        fits.Column(
            name=n,
            format=COLUMN_FORMATS[n][0],
            unit=COLUMN_FORMATS[n][1],
            array=np.asarray(columns[n]),
        )
        for n in names
    ]
    hdr = product_header(header)
    hdr["DATALEVL"] = (level, "TAUVEX data level")
    hdr["NCOUNTS"] = (int(np.asarray(columns["W"]).size), "events in this table")
    table = fits.BinTableHDU.from_columns(cols, header=hdr, name="EVENTS")
    prim = fits.PrimaryHDU()
    for key in ("TELESCOP", "TELE_NUM", "FILTER", "OBS_ID", "DATALEVL"):
        if key in hdr:
            prim.header[key] = (hdr[key], hdr.comments[key])
    return fits.HDUList([prim, table])


def event_columns(hdul: fits.HDUList) -> tuple[dict[str, NDArray], fits.Header]:
    """Columns (native-endian numpy arrays) and header of a Level 1a..1g product."""
    hdu = hdul["EVENTS"]
    data = hdu.data
    names = hdu.columns.names
    cols = {
        n: np.asarray(data[n]).astype(np.asarray(data[n]).dtype.newbyteorder("=")) for n in names
    }
    return cols, hdu.header
