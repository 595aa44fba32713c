"""CCSDS space packets (CCSDS 133.0-B): primary header, CRC-16, building and scanning packets.

Mission-neutral: a mission's telemetry layout (APIDs, secondary header, payload) lives with
that mission's decoder (e.g. `services/decode/mips/telemetry.py`) and is built on this module.

Packet = primary header (6 bytes, big-endian)::

    bits 0-2   version (0)          bit 3    type (0 = telemetry)
    bit 4      secondary-header flag bits 5-15 APID (11 bits)
    bits 16-17 sequence flags (01 first, 00 continuation, 10 last, 11 unsegmented)
    bits 18-31 sequence count (14 bits, per APID, modulo 16384)
    bits 32-47 packet data length = (bytes in the data field) - 1

followed by the packet data field. skybus packets end in a CRC-16 (CCSDS CRC-16-CCITT:
polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR) over every byte of the
packet before it, stored big-endian in the last two bytes of the data field.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass

import numpy as np

PRIMARY_HEADER_BYTES = 6
CRC_BYTES = 2
SEQ_COUNT_MODULO = 1 << 14
MAX_DATA_FIELD_BYTES = 65536

SEQ_CONTINUATION = 0b00
SEQ_FIRST = 0b01
SEQ_LAST = 0b10
SEQ_UNSEGMENTED = 0b11

_PRIMARY = struct.Struct(">HHH")


def crc16_ccitt(data: bytes | memoryview) -> int:
    """CCSDS CRC-16-CCITT (poly 0x1021, init 0xFFFF, no reflection, no final XOR).

    `binascii.crc_hqx` is exactly this polynomial without reflection, computed in C.
    """
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True, slots=True)
class PrimaryHeader:
    """The six-byte CCSDS primary header, decoded."""

    version: int
    packet_type: int
    sec_hdr_flag: int
    apid: int
    seq_flags: int
    seq_count: int
    data_length: int  #: the raw field: bytes in the data field minus one

    @property
    def packet_bytes(self) -> int:
        """Total packet length in bytes (primary header + data field)."""
        return PRIMARY_HEADER_BYTES + self.data_length + 1

    def pack(self) -> bytes:
        word0 = (
            (self.version & 0x7) << 13
            | (self.packet_type & 0x1) << 12
            | (self.sec_hdr_flag & 0x1) << 11
            | (self.apid & 0x7FF)
        )
        word1 = (self.seq_flags & 0x3) << 14 | (self.seq_count % SEQ_COUNT_MODULO)
        return _PRIMARY.pack(word0, word1, self.data_length)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> PrimaryHeader:
        word0, word1, length = _PRIMARY.unpack_from(buf, offset)
        return cls(
            version=word0 >> 13,
            packet_type=(word0 >> 12) & 0x1,
            sec_hdr_flag=(word0 >> 11) & 0x1,
            apid=word0 & 0x7FF,
            seq_flags=word1 >> 14,
            seq_count=word1 & 0x3FFF,
            data_length=length,
        )


def build_packet(*, apid: int, seq_flags: int, seq_count: int, body: bytes) -> bytes:
    """One telemetry packet with a secondary header flag set: header + `body` + CRC-16.

    `body` is the data field without the CRC (secondary header first).
    """
    n_data = len(body) + CRC_BYTES
    if n_data > MAX_DATA_FIELD_BYTES:
        raise ValueError(f"packet data field of {n_data} bytes exceeds {MAX_DATA_FIELD_BYTES}")
    head = PrimaryHeader(0, 0, 1, apid, seq_flags, seq_count, n_data - 1).pack()
    without_crc = head + body
    return without_crc + struct.pack(">H", crc16_ccitt(without_crc))


def packet_crc_ok(packet: bytes | memoryview) -> bool:
    """True when the last two bytes of `packet` are the CRC-16 of the rest."""
    if len(packet) < PRIMARY_HEADER_BYTES + CRC_BYTES:
        return False
    stored = struct.unpack_from(">H", packet, len(packet) - CRC_BYTES)[0]
    return bool(crc16_ccitt(packet[: len(packet) - CRC_BYTES]) == stored)


def header_word0(apid: int) -> int:
    """First 16 bits of a version-0 telemetry packet with a secondary header on `apid`."""
    return 1 << 11 | (apid & 0x7FF)


def find_packet_starts(
    data: bytes | memoryview, start: int, apids: set[int] | frozenset[int]
) -> np.ndarray:
    """Byte offsets >= `start` whose first two bytes could open a packet on one of `apids`.

    Vectorised candidate search used to regain packet sync after a corrupt length field;
    the caller confirms each candidate (e.g. with its CRC).
    """
    buf = np.frombuffer(data, dtype=np.uint8)[start:]
    if buf.size < 2:
        return np.zeros(0, dtype=np.int64)
    word = (buf[:-1].astype(np.uint16) << 8) | buf[1:]
    wanted = np.array([header_word0(a) for a in sorted(apids)], dtype=np.uint16)
    return np.flatnonzero(np.isin(word, wanted)).astype(np.int64) + start
