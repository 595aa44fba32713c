"""MIPS telemetry layout: APIDs, DCE header packet, segmented array packets.

Documented in docs/mips-telemetry.md.

The single place where the packet layout of skybus's MIPS telemetry is defined: the simulator
writes it with `MipsTelemetryWriter`, ingest scans it, decode reads it with `parse_dce`.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from shared import ccsds
from shared.instruments import mips

#: APID of the DCE header / housekeeping packet that opens every DCE.
APID_DCE_HEADER = 0x5A0
#: APIDs of the array data packets, by MIPS channel (1 = 24 um, 2 = 70 um, 3 = 160 um).
APID_ARRAY: dict[int, int] = {1: 0x5A1, 2: 0x5A2, 3: 0x5A3}
CHANNEL_OF_APID: dict[int, int] = {v: k for k, v in APID_ARRAY.items()}
MIPS_APIDS = frozenset({APID_DCE_HEADER, *APID_ARRAY.values()})

LAYOUT_VERSION = 1
#: Payload bytes per array packet (the last segment of a DCE may be shorter).
DEFAULT_SEGMENT_BYTES = 8192
#: The spacecraft clock counts seconds from this epoch (leap seconds ignored).
SCLK_EPOCH = dt.datetime(1980, 1, 1, tzinfo=dt.UTC)
SCLK_EPOCH_MJD = 44239.0
#: Slope plane scale of the 24 um raw product: stored int32 = round(slope DN/sample * SLPSCALE).
DEFAULT_SLPSCALE = 1000

AOT_CODES: dict[str, int] = {"MIPSPHOT": 1, "MIPSSCAN": 2}
AOT_NAMES: dict[int, str] = {v: k for k, v in AOT_CODES.items()}

#: Secondary header: SCLK seconds (uint32), subseconds (uint16, units of 1/65536 s).
SECONDARY = struct.Struct(">IH")
#: DCE header packet body after the secondary header.
DCE_HEADER = struct.Struct(">BIHHBBBBdHHHHHdddIIIH")
#: Array packet segment header after the secondary header.
SEGMENT_HEADER = struct.Struct(">IHHBBHHI")

DCE_HEADER_PACKET_BYTES = (
    ccsds.PRIMARY_HEADER_BYTES + SECONDARY.size + DCE_HEADER.size + ccsds.CRC_BYTES
)
ARRAY_PACKET_OVERHEAD = (
    ccsds.PRIMARY_HEADER_BYTES + SECONDARY.size + SEGMENT_HEADER.size + ccsds.CRC_BYTES
)


class MipsTelemetryError(ValueError):
    """The packets of a DCE are corrupt or incomplete: the DCE cannot be decoded."""


@dataclass(frozen=True, slots=True)
class DceDescriptor:
    """Everything the DCE header packet carries about one DCE."""

    aorkey: int
    expid: int
    dcenum: int
    channel: int  #: CHNLNUM: 1 = 24 um, 2 = 70 um, 3 = 160 um
    aot_type: str  #: "MIPSPHOT" or "MIPSSCAN"
    stim_flash: bool  #: Ge stim flash during this DCE
    exptime_s: float
    nsamples: int  #: ramp samples (24 um: samples fitted on board)
    nplanes: int  #: planes of the payload cube (24 um: 2; Ge: NSAMPLES)
    nrows: int
    ncols: int
    n_dce_group: int  #: DCEs of this channel in the AOR
    ra_deg: float  #: commanded array-centre pointing
    dec_deg: float
    pa_deg: float
    satlevel_dn: int  #: full well of a ramp sample
    slpscale: int  #: 24 um slope plane scale (1 for Ge)
    sclk_s: int  #: spacecraft clock at the start of the DCE, seconds
    sclk_subsec: int  #: and 1/65536 s
    nramps: int = 1  #: ramps per DCE (160 um: 2)

    @property
    def payload_bytes(self) -> int:
        return 4 * self.nplanes * self.nrows * self.ncols

    @property
    def sclk(self) -> float:
        """Spacecraft clock in seconds (SCLK_OBS)."""
        return self.sclk_s + self.sclk_subsec / 65536.0

    @property
    def mjd(self) -> float:
        return SCLK_EPOCH_MJD + self.sclk / 86400.0

    @property
    def date_obs(self) -> str:
        t = SCLK_EPOCH + dt.timedelta(seconds=self.sclk)
        return t.replace(tzinfo=None).isoformat(timespec="milliseconds")


def n_segments(payload_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> int:
    return max(1, -(-payload_bytes // segment_bytes))


class MipsTelemetryWriter:
    """Turns DCEs into packets, keeping the per-APID sequence counters of one downlink."""

    def __init__(self, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if segment_bytes % 4 or not 0 < segment_bytes <= 60000:
            raise ValueError("segment_bytes must be a positive multiple of 4, <= 60000")
        self.segment_bytes = segment_bytes
        self._seq: dict[int, int] = {}

    def _next(self, apid: int) -> int:
        n = self._seq.get(apid, 0)
        self._seq[apid] = (n + 1) % ccsds.SEQ_COUNT_MODULO
        return n

    def dce_packets(self, desc: DceDescriptor, cube: np.ndarray) -> bytes:
        """The header packet and the array packets of one DCE (`cube`: int32 planes)."""
        expected = (desc.nplanes, desc.nrows, desc.ncols)
        if cube.shape != expected:
            raise ValueError(f"cube shape {cube.shape} differs from the descriptor's {expected}")
        payload = np.ascontiguousarray(cube, dtype=">i4").tobytes()
        nseg = n_segments(len(payload), self.segment_bytes)
        sec = SECONDARY.pack(desc.sclk_s, desc.sclk_subsec)
        head_body = sec + DCE_HEADER.pack(
            LAYOUT_VERSION,
            desc.aorkey,
            desc.expid,
            desc.dcenum,
            desc.channel,
            AOT_CODES[desc.aot_type],
            int(desc.stim_flash),
            desc.nramps,
            desc.exptime_s,
            desc.nsamples,
            desc.nplanes,
            desc.nrows,
            desc.ncols,
            desc.n_dce_group,
            desc.ra_deg,
            desc.dec_deg,
            desc.pa_deg,
            desc.satlevel_dn,
            desc.slpscale,
            len(payload),
            nseg,
        )
        out = [
            ccsds.build_packet(
                apid=APID_DCE_HEADER,
                seq_flags=ccsds.SEQ_UNSEGMENTED,
                seq_count=self._next(APID_DCE_HEADER),
                body=head_body,
            )
        ]
        apid = APID_ARRAY[desc.channel]
        for iseg in range(nseg):
            lo = iseg * self.segment_bytes
            chunk = payload[lo : lo + self.segment_bytes]
            if nseg == 1:
                flags = ccsds.SEQ_UNSEGMENTED
            elif iseg == 0:
                flags = ccsds.SEQ_FIRST
            elif iseg == nseg - 1:
                flags = ccsds.SEQ_LAST
            else:
                flags = ccsds.SEQ_CONTINUATION
            seg = SEGMENT_HEADER.pack(
                desc.aorkey, desc.expid, desc.dcenum, desc.channel, 0, iseg, nseg, lo
            )
            out.append(
                ccsds.build_packet(
                    apid=apid, seq_flags=flags, seq_count=self._next(apid), body=sec + seg + chunk
                )
            )
        return b"".join(out)


def unpack_dce_header(packet: bytes | memoryview) -> tuple[DceDescriptor, int]:
    """Descriptor and number of array packets from a DCE header packet (CRC checked before)."""
    if len(packet) != DCE_HEADER_PACKET_BYTES:
        raise MipsTelemetryError(
            f"DCE header packet has {len(packet)} bytes, the layout needs {DCE_HEADER_PACKET_BYTES}"
        )
    sclk_s, sub = SECONDARY.unpack_from(packet, ccsds.PRIMARY_HEADER_BYTES)
    f = DCE_HEADER.unpack_from(packet, ccsds.PRIMARY_HEADER_BYTES + SECONDARY.size)
    (ver, aorkey, expid, dcenum, channel, aot, stim, nramps, exptime, nsamples, nplanes, nrows,
     ncols, ngroup, ra, dec, pa, satlevel, slpscale, nbytes, nseg) = f  # fmt: skip
    if ver != LAYOUT_VERSION:
        raise MipsTelemetryError(
            f"DCE header layout version {ver}, this decoder reads {LAYOUT_VERSION}"
        )
    if channel not in APID_ARRAY or aot not in AOT_NAMES:
        raise MipsTelemetryError(f"DCE header names unknown channel {channel} or AOT code {aot}")
    desc = DceDescriptor(
        aorkey=aorkey, expid=expid, dcenum=dcenum, channel=channel, aot_type=AOT_NAMES[aot],
        stim_flash=bool(stim), exptime_s=exptime, nsamples=nsamples, nplanes=nplanes,
        nrows=nrows, ncols=ncols, n_dce_group=ngroup, ra_deg=ra, dec_deg=dec, pa_deg=pa,
        satlevel_dn=satlevel, slpscale=slpscale, sclk_s=sclk_s, sclk_subsec=sub, nramps=nramps,
    )  # fmt: skip
    if nbytes != desc.payload_bytes:
        raise MipsTelemetryError(
            f"DCE header announces {nbytes} payload bytes but its shape needs {desc.payload_bytes}"
        )
    return desc, nseg


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    aorkey: int
    expid: int
    dcenum: int
    channel: int
    index: int
    count: int
    byte_offset: int


def unpack_segment_header(packet: bytes | memoryview) -> SegmentHeader:
    a, e, d, c, _, i, n, off = SEGMENT_HEADER.unpack_from(
        packet, ccsds.PRIMARY_HEADER_BYTES + SECONDARY.size
    )
    return SegmentHeader(a, e, d, c, i, n, off)


def split_packets(chunk: bytes) -> list[tuple[int, ccsds.PrimaryHeader]]:
    """(offset, header) of every packet in a chunk known to hold whole packets, CRC-checked."""
    out = []
    pos = 0
    view = memoryview(chunk)
    while pos < len(chunk):
        if len(chunk) - pos < ccsds.PRIMARY_HEADER_BYTES:
            raise MipsTelemetryError(f"{len(chunk) - pos} stray bytes at offset {pos} of the DCE")
        ph = ccsds.PrimaryHeader.unpack(chunk, pos)
        end = pos + ph.packet_bytes
        if end > len(chunk):
            raise MipsTelemetryError(f"packet at offset {pos} runs past the end of the DCE chunk")
        if not ccsds.packet_crc_ok(view[pos:end]):
            raise MipsTelemetryError(f"packet at offset {pos} (APID {ph.apid:#x}) fails its CRC")
        out.append((pos, ph))
        pos = end
    return out


def parse_dce(chunk: bytes) -> tuple[DceDescriptor, np.ndarray]:
    """Descriptor and int32 cube (planes, rows, cols) from the packets of one DCE.

    Raises `MipsTelemetryError` when a packet is corrupt, missing, or belongs elsewhere.
    """
    if not chunk:
        raise MipsTelemetryError("empty DCE chunk")
    packets = split_packets(chunk)
    off0, ph0 = packets[0]
    if ph0.apid != APID_DCE_HEADER:
        raise MipsTelemetryError(
            f"a DCE chunk must open with a DCE header packet (APID {APID_DCE_HEADER:#x}), "
            f"found APID {ph0.apid:#x}"
        )
    desc, nseg_header = unpack_dce_header(chunk[off0 : off0 + ph0.packet_bytes])
    apid = APID_ARRAY[desc.channel]
    payload_parts: list[memoryview] = []
    expected_offset = 0
    view = memoryview(chunk)
    nseg_expected = nseg_header
    for off, ph in packets[1:]:
        if ph.apid != apid:
            raise MipsTelemetryError(
                f"packet at offset {off} has APID {ph.apid:#x}; "
                f"channel {desc.channel} uses {apid:#x}"
            )
        seg = unpack_segment_header(view[off : off + ph.packet_bytes])
        if (seg.aorkey, seg.expid, seg.dcenum, seg.channel) != (
            desc.aorkey, desc.expid, desc.dcenum, desc.channel
        ):  # fmt: skip
            raise MipsTelemetryError(f"packet at offset {off} belongs to another DCE: {seg}")
        if seg.index != len(payload_parts) or seg.byte_offset != expected_offset:
            raise MipsTelemetryError(
                f"segment {seg.index} at byte {seg.byte_offset} out of order "
                f"(expected segment {len(payload_parts)} at byte {expected_offset})"
            )
        if seg.count != nseg_header:
            raise MipsTelemetryError(
                f"packet at offset {off} says {seg.count} segments, the DCE header {nseg_header}"
            )
        lo = off + ARRAY_PACKET_OVERHEAD - ccsds.CRC_BYTES
        part = view[lo : off + ph.packet_bytes - ccsds.CRC_BYTES]
        payload_parts.append(part)
        expected_offset += len(part)
    if len(payload_parts) != nseg_expected:
        raise MipsTelemetryError(
            f"DCE {desc.expid}/{desc.dcenum} ch {desc.channel}: {len(payload_parts)} of "
            f"{nseg_expected} data segments present"
        )
    if expected_offset != desc.payload_bytes:
        raise MipsTelemetryError(
            f"DCE payload has {expected_offset} bytes, header announces {desc.payload_bytes}"
        )
    payload = b"".join(payload_parts)
    cube = np.frombuffer(payload, dtype=">i4").reshape(desc.nplanes, desc.nrows, desc.ncols)
    return desc, cube.astype(np.int32)


def raw_header(desc: DceDescriptor) -> fits.Header:
    """Spitzer raw-product header keywords of one DCE."""
    band = mips.BANDS[desc.channel]
    h = fits.Header()
    h["TELESCOP"] = (mips.TELESCOP, "Telescope")
    h["INSTRUME"] = (mips.INSTRUME, "Instrument")
    h["CHNLNUM"] = (desc.channel, "1 = 24um, 2 = 70um, 3 = 160um")
    h["DETECTOR"] = (band.detector, "Detector material")
    h["AORKEY"] = (desc.aorkey, "AOR key")
    h["EXPID"] = (desc.expid, "Exposure ID")
    h["DCENUM"] = (desc.dcenum, "DCE number within the exposure")
    h["AOT_TYPE"] = (desc.aot_type, "Astronomical observation template")
    h["EXPTIME"] = (desc.exptime_s, "[s] exposure time")
    h["NSAMPLES"] = (desc.nsamples, "Ramp samples per pixel")
    h["NRAMPS"] = (desc.nramps, "Ramps per DCE")
    h["DATE_OBS"] = (desc.date_obs, "UTC start of the DCE (from SCLK)")
    h["MJD_OBS"] = (desc.mjd, "[d] MJD start of the DCE")
    h["SCLK_OBS"] = (desc.sclk, "[s] spacecraft clock at DCE start")
    h["RA_REF"] = (desc.ra_deg, "[deg] commanded RA of array centre")
    h["DEC_REF"] = (desc.dec_deg, "[deg] commanded Dec of array centre")
    h["PA_REF"] = (desc.pa_deg, "[deg] commanded PA of array +y, E of N")
    h["SATLEVEL"] = (desc.satlevel_dn, "[DN] full well of a ramp sample")
    if desc.channel == 1:
        h["SLPSCALE"] = (desc.slpscale, "slope plane = stored value / SLPSCALE DN/sample")
        h["SAMPTIME"] = (mips.SI_SAMPLE_S, "[s] time between samples")
    else:
        h["STIMFLSH"] = (desc.stim_flash, "Stim flash during this DCE")
        h["SAMPTIME"] = (1.0 / mips.GE_SAMPLE_RATE_HZ, "[s] time between samples")
    h["NDCEGRP"] = (desc.n_dce_group, "DCEs of this channel in the AOR")
    h["BUNIT"] = ("DN", "Units of the data")
    return h


def raw_hdulist(desc: DceDescriptor, cube: np.ndarray) -> fits.HDUList:
    """The Spitzer raw product of one DCE: primary HDU, int32 cube, raw header."""
    hdu = fits.PrimaryHDU(data=np.asarray(cube, dtype=np.int32), header=raw_header(desc))
    return fits.HDUList([hdu])
