"""MIPS ingest: cut an AOR's CCSDS telemetry into DCEs, and recognise Spitzer archive FITS files.

`split_aor_telemetry` walks the packet stream once, checks every packet (CRC-16, length,
APID, sequence count), regains sync after a corrupt length, and hands back one chunk of
packets per complete DCE plus a list of readable problems; a corrupt packet loses only its
own DCE. `recognise_spitzer_fits` tells what a Spitzer FITS file is from its name and header.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from services.decode.mips import telemetry as tlm
from shared import ccsds
from shared.instruments import mips


class NotMipsTelemetryError(ValueError):
    """The bytes are not skybus MIPS telemetry (no valid MIPS packet where one must be)."""


class SpitzerNameMismatchError(ValueError):
    """A Spitzer file's name and its header disagree about what the file is."""


@dataclass(frozen=True, slots=True)
class DceChunk:
    """The packets of one complete DCE, as cut from the AOR's telemetry."""

    aorkey: int
    channel: int
    expid: int
    dcenum: int
    n_dce_in_group: int  #: DCEs of this channel in the AOR (the group decode/calibrate awaits)
    is_stim: bool
    sclk_s: float  #: spacecraft clock at the DCE start
    offset: int  #: byte offset of the DCE's first packet in the telemetry file
    data: bytes  #: DCE header packet + array packets, ready for `decode_dce`

    def raw_name(self, version: int = 1) -> str:
        """Spitzer name of the raw product this DCE decodes to."""
        return mips.bcd_name(self.channel, self.aorkey, self.expid, self.dcenum, version, "raw")


ProblemKind = Literal[
    "bad_crc",
    "bad_length",
    "truncated",
    "unknown_apid",
    "sequence_gap",
    "bad_header",
    "incomplete_dce",
    "orphan_packets",
]


@dataclass(frozen=True, slots=True)
class TelemetryProblem:
    """Something wrong in the telemetry, with the byte offset where it was found."""

    kind: ProblemKind
    offset: int
    reason: str
    apid: int | None = None
    #: (aorkey, channel, expid, dcenum) of the DCE lost, when known
    dce: tuple[int, int, int, int] | None = None

    def __str__(self) -> str:
        return f"{self.kind} at byte {self.offset}: {self.reason}"


@dataclass(frozen=True, slots=True)
class MipsSplit:
    """Result of `split_aor_telemetry`: complete DCEs in telemetry order and the problems."""

    chunks: list[DceChunk]
    problems: list[TelemetryProblem]
    n_packets: int  #: packets read with a valid CRC
    aorkeys: tuple[int, ...] = ()

    @property
    def dces(self) -> list[DceChunk]:
        """Alias of `chunks`."""
        return self.chunks

    @property
    def lost_dces(self) -> list[tuple[int, int, int, int]]:
        """(aorkey, channel, expid, dcenum) of DCEs known to be lost."""
        return [p.dce for p in self.problems if p.dce is not None and p.kind in _LOSS_KINDS]


_LOSS_KINDS = frozenset({"incomplete_dce", "orphan_packets", "bad_header"})
_MAX_ARRAY_PACKET = tlm.ARRAY_PACKET_OVERHEAD + 60000


def _plausible(ph: ccsds.PrimaryHeader) -> bool:
    """Header fields consistent with a MIPS packet (before looking at the CRC)."""
    if ph.version != 0 or ph.packet_type != 0 or ph.sec_hdr_flag != 1:
        return False
    if ph.apid == tlm.APID_DCE_HEADER:
        return ph.packet_bytes == tlm.DCE_HEADER_PACKET_BYTES
    if ph.apid in tlm.CHANNEL_OF_APID:
        n = ph.packet_bytes
        return (
            tlm.ARRAY_PACKET_OVERHEAD < n <= _MAX_ARRAY_PACKET
            and (n - tlm.ARRAY_PACKET_OVERHEAD) % 4 == 0
        )
    return False


@dataclass
class _Open:
    """The DCE being assembled."""

    desc: tlm.DceDescriptor
    nseg: int
    offset: int
    packets: list[bytes] = field(default_factory=list)
    next_index: int = 0
    broken: str = ""

    @property
    def ident(self) -> tuple[int, int, int, int]:
        d = self.desc
        return (d.aorkey, d.channel, d.expid, d.dcenum)


class _Scanner:
    """One pass over the packet stream (state kept here, not in globals)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.view = memoryview(data)
        self.n = len(data)
        self.problems: list[TelemetryProblem] = []
        self.dces: list[DceChunk] = []
        self.seq: dict[int, int] = {}
        self.open: _Open | None = None
        self.orphan_reported: tuple[int, int, int, int] | None = None
        self.n_packets = 0

    # --- packet boundaries
    def valid_at(self, pos: int) -> ccsds.PrimaryHeader | None:
        """The header of a complete, plausible, CRC-valid MIPS packet at `pos`, else None."""
        if self.n - pos < ccsds.PRIMARY_HEADER_BYTES:
            return None
        ph = ccsds.PrimaryHeader.unpack(self.data, pos)
        if not _plausible(ph) or pos + ph.packet_bytes > self.n:
            return None
        if not ccsds.packet_crc_ok(self.view[pos : pos + ph.packet_bytes]):
            return None
        return ph

    def resync(self, start: int, limit: int | None = None) -> int | None:
        """Offset of the next valid packet at or after `start` (searched in growing windows)."""
        end_all = self.n if limit is None else min(self.n, limit)
        window = 1 << 17
        lo = start
        while lo < end_all:
            hi = min(end_all, lo + window)
            cands = ccsds.find_packet_starts(self.view[: min(self.n, hi + 1)], lo, tlm.MIPS_APIDS)
            for c in cands:
                if self.valid_at(int(c)) is not None:
                    return int(c)
            lo = hi
            window *= 2
        return None

    def problem(self, kind: ProblemKind, offset: int, reason: str, **kw: Any) -> None:
        self.problems.append(TelemetryProblem(kind, offset, reason, **kw))

    # --- DCE assembly
    def close_open(self, why: str, offset: int) -> None:
        """The open DCE ends without its last segment: it is lost."""
        cur = self.open
        if cur is None:
            return
        self.open = None
        reason = cur.broken or (f"only {cur.next_index} of {cur.nseg} data segments before {why}")
        d = cur.desc
        self.problem(
            "incomplete_dce", cur.offset,
            f"DCE ch{d.channel} expid {d.expid} dcenum {d.dcenum} lost: {reason}",
            dce=cur.ident,
        )  # fmt: skip

    def break_open(self, reason: str) -> None:
        if self.open is not None and not self.open.broken:
            self.open.broken = reason

    def good_packet(self, pos: int, ph: ccsds.PrimaryHeader) -> None:
        self.n_packets += 1
        pkt = self.data[pos : pos + ph.packet_bytes]
        last = self.seq.get(ph.apid)
        if last is not None and ph.seq_count != (last + 1) % ccsds.SEQ_COUNT_MODULO:
            missing = (ph.seq_count - last - 1) % ccsds.SEQ_COUNT_MODULO
            self.problem(
                "sequence_gap", pos,
                f"APID {ph.apid:#x}: {missing} packet(s) missing before sequence count "
                f"{ph.seq_count} (previous {last})",
                apid=ph.apid,
            )  # fmt: skip
            if self.open is not None and ph.apid == tlm.APID_ARRAY[self.open.desc.channel]:
                self.break_open(f"{missing} packet(s) missing on its APID (sequence gap)")
        self.seq[ph.apid] = ph.seq_count
        if ph.apid == tlm.APID_DCE_HEADER:
            self.close_open("the next DCE header", pos)
            try:
                desc, nseg = tlm.unpack_dce_header(pkt)
            except tlm.MipsTelemetryError as exc:
                self.problem(
                    "bad_header", pos, f"DCE header packet unreadable: {exc}", apid=ph.apid
                )
                return
            self.open = _Open(desc, nseg, pos, [pkt])
            return
        seg = tlm.unpack_segment_header(pkt)
        ident = (seg.aorkey, seg.channel, seg.expid, seg.dcenum)
        cur = self.open
        if cur is None or cur.ident != ident or tlm.CHANNEL_OF_APID[ph.apid] != cur.desc.channel:
            if cur is not None and cur.ident != ident:
                self.close_open("a packet of another DCE", pos)
            if self.orphan_reported != ident:
                self.orphan_reported = ident
                self.problem(
                    "orphan_packets", pos,
                    f"DCE ch{seg.channel} expid {seg.expid} dcenum {seg.dcenum} lost: data "
                    "packets without their DCE header packet (header corrupt or missing)",
                    apid=ph.apid, dce=ident,
                )  # fmt: skip
            return
        if seg.index != cur.next_index:
            self.break_open(
                f"segment {seg.index} follows segment {cur.next_index - 1} "
                f"({seg.index - cur.next_index} segment(s) missing)"
            )
        cur.packets.append(pkt)
        cur.next_index = seg.index + 1
        if seg.index == seg.count - 1:
            self.open = None
            d = cur.desc
            if cur.broken or seg.count != cur.nseg:
                reason = cur.broken or f"{seg.count} segments announced, header says {cur.nseg}"
                self.problem(
                    "incomplete_dce", cur.offset,
                    f"DCE ch{d.channel} expid {d.expid} dcenum {d.dcenum} lost: {reason}",
                    dce=cur.ident,
                )  # fmt: skip
                return
            self.dces.append(
                DceChunk(
                    aorkey=d.aorkey,
                    channel=d.channel,
                    expid=d.expid,
                    dcenum=d.dcenum,
                    n_dce_in_group=d.n_dce_group,
                    is_stim=d.stim_flash,
                    sclk_s=d.sclk,
                    offset=cur.offset,
                    data=b"".join(cur.packets),
                )
            )

    # --- the walk
    def run(self) -> None:
        first = self.resync(0, limit=1 << 18)
        if first is None:
            head = bytes(self.data[:8])
            raise NotMipsTelemetryError(
                f"no valid MIPS telemetry packet (APIDs {sorted(tlm.MIPS_APIDS)}, CRC-16 checked) "
                f"in the first {min(self.n, 1 << 18)} bytes (file starts {head!r}); "
                "is this a MIPS telemetry file?"
            )
        if first > 0:
            self.problem("bad_length", 0, f"{first} unreadable bytes before the first packet")
        pos = first
        while pos < self.n:
            if self.n - pos < ccsds.PRIMARY_HEADER_BYTES:
                self.problem(
                    "truncated", pos, f"file ends with {self.n - pos} bytes of a packet header"
                )
                break
            ph = ccsds.PrimaryHeader.unpack(self.data, pos)
            end = pos + ph.packet_bytes
            if _plausible(ph) and end <= self.n:
                if ccsds.packet_crc_ok(self.view[pos:end]):
                    self.good_packet(pos, ph)
                    pos = end
                    continue
                if end == self.n or self.valid_at(end) is not None:
                    # The boundary holds: only this packet's content is corrupt.
                    self.problem(
                        "bad_crc", pos,
                        f"packet on APID {ph.apid:#x} (sequence count {ph.seq_count}, "
                        f"{ph.packet_bytes} bytes) fails its CRC-16; packet dropped",
                        apid=ph.apid,
                    )  # fmt: skip
                    # Its header held the boundary, so trust its sequence count: the next
                    # packet on this APID then shows no gap for a packet already reported.
                    self.seq[ph.apid] = ph.seq_count
                    pos = end
                    continue
            elif (
                ph.version == 0 and ph.apid not in tlm.MIPS_APIDS and end <= self.n
                and (end == self.n or self.valid_at(end) is not None)
            ):  # fmt: skip
                self.problem(
                    "unknown_apid", pos,
                    f"packet on unknown APID {ph.apid:#x} ({ph.packet_bytes} bytes) skipped",
                    apid=ph.apid,
                )  # fmt: skip
                pos = end
                continue
            nxt = self.resync(pos + 1)
            if nxt is None and _plausible(ph) and end > self.n:
                self.problem(
                    "truncated", pos,
                    f"file ends inside a packet on APID {ph.apid:#x}: it needs "
                    f"{ph.packet_bytes} bytes, {self.n - pos} present",
                    apid=ph.apid,
                )  # fmt: skip
                self.break_open("the file is truncated")
                break
            skipped = (nxt if nxt is not None else self.n) - pos
            self.problem(
                "bad_length", pos,
                f"corrupt packet header (APID field {ph.apid:#x}, length field "
                f"{ph.data_length}): packet boundary lost, {skipped} bytes skipped to "
                + (f"the next valid packet at {nxt}" if nxt is not None else "the end of file"),
            )  # fmt: skip
            self.break_open(f"a corrupt packet at offset {pos}")
            if nxt is None:
                break
            pos = nxt
        self.close_open("the end of the file", self.n)


def first_valid_packet(data: bytes, limit: int = 1 << 18) -> int | None:
    """Byte offset of the first complete, CRC-valid MIPS packet in the first `limit` bytes,
    or None: the content test that tells MIPS telemetry whose first packet is damaged."""
    if not data:
        return None
    return _Scanner(bytes(data)).resync(0, limit=limit)


def split_aor_telemetry(data: bytes) -> MipsSplit:
    """Cut a MIPS AOR telemetry file (concatenated CCSDS packets) into complete DCEs.

    Each packet is checked (version, APID, length, CRC-16-CCITT, per-APID sequence count);
    a bad packet is reported in `problems` with its byte offset and loses only its own DCE
    (the DCEs around it are returned). After a corrupt length field the scan regains sync at
    the next packet whose CRC is valid. Raises `NotMipsTelemetryError` (a ValueError) when
    the bytes hold no MIPS packet at all.
    """
    if not data:
        raise NotMipsTelemetryError("empty telemetry file: nothing to ingest")
    scanner = _Scanner(bytes(data))
    scanner.run()
    aorkeys = tuple(sorted({c.aorkey for c in scanner.dces}))
    return MipsSplit(scanner.dces, scanner.problems, scanner.n_packets, aorkeys)


# --- Spitzer archive FITS ----------------------------------------------------------------

_DCE_NAME = re.compile(
    r"^SPITZER_(?P<inst>[MI])(?P<ch>\d)_(?P<aor>\d+)_(?P<expid>\d{4})_(?P<dce>\d{4})_"
    r"(?P<ver>\d+)_(?P<type>[a-z0-9]+)\.fits(?:\.gz|\.fz)?$",
    re.IGNORECASE,
)
_PBCD_NAME = re.compile(
    r"^SPITZER_(?P<inst>[MI])(?P<ch>\d)_(?P<aor>\d+)_(?P<expid>\d{4})_(?P<ver>\d+)_"
    r"(?P<ens>[EA]\d+)_(?P<type>[a-z0-9]+)\.fits(?:\.gz|\.fz)?$",
    re.IGNORECASE,
)
#: Per-DCE product types and their level.
RAW_TYPES = frozenset({"raw", "dce"})
BCD_TYPES = frozenset(
    {"bcd", "bunc", "bbmsk", "bmask", "brmsk", "fbcd", "ebcd", "cbcd", "cbunc", "bimsk", "rmask"}
)
_INSTRUMENTS = {"M": "MIPS", "I": "IRAC"}
#: TELESCOP values of Spitzer files (early archive products say SIRTF, the pre-launch name).
SPITZER_TELESCOP = frozenset({"spitzer", "sirtf"})

Level = Literal["raw", "bcd", "pbcd"]


@dataclass(frozen=True, slots=True)
class SpitzerFileInfo:
    """What a Spitzer FITS file is: instrument, channel, AOR, DCE, level and product type."""

    instrument: str  #: "MIPS" or "IRAC"
    channel: int
    aorkey: int
    expid: int
    dcenum: int | None  #: None for post-BCD products
    version: int | None  #: None when recognised from the header only
    level: Level
    product_type: str  #: raw, bcd, bunc, bbmsk, bmask, cbcd, maic ...
    from_name: bool  #: recognised by its Spitzer name (else by its header)


def _hget(header: Mapping[str, Any] | None, key: str) -> Any:
    if header is None:
        return None
    try:
        return header.get(key)
    except (KeyError, AttributeError):
        return None


def recognise_spitzer_fits(
    name: str, header: Mapping[str, Any] | None = None
) -> SpitzerFileInfo | None:
    """Recognise a Spitzer MIPS/IRAC FITS file by its name, else by its header.

    Names: `SPITZER_M<ch>_<aorkey>_<expid>_<dcenum>_<version>_<type>.fits` (IRAC `I<ch>`)
    and post-BCD `SPITZER_M<ch>_<aorkey>_<expid>_<version>_E<ensemble>_<type>.fits`. A name
    that is not Spitzer-like falls back to the header (TELESCOP, INSTRUME, CHNLNUM, AORKEY,
    EXPID, DCENUM; BUNIT 'DN' means raw). Returns None when neither says Spitzer; raises
    `SpitzerNameMismatchError` when name and header disagree.
    """
    base = os.path.basename(name)
    m = _DCE_NAME.match(base)
    pm = None if m else _PBCD_NAME.match(base)
    info: SpitzerFileInfo | None = None
    if m:
        ptype = m["type"].lower()
        level: Level
        if ptype in RAW_TYPES:
            level = "raw"
        elif ptype in BCD_TYPES:
            level = "bcd"
        else:
            level = "raw" if str(_hget(header, "BUNIT") or "").strip() == "DN" else "bcd"
        info = SpitzerFileInfo(
            _INSTRUMENTS[m["inst"].upper()], int(m["ch"]), int(m["aor"]), int(m["expid"]),
            int(m["dce"]), int(m["ver"]), level, ptype, True,
        )  # fmt: skip
    elif pm:
        info = SpitzerFileInfo(
            _INSTRUMENTS[pm["inst"].upper()], int(pm["ch"]), int(pm["aor"]), int(pm["expid"]),
            None, int(pm["ver"]), "pbcd", pm["type"].lower(), True,
        )  # fmt: skip
    if info is not None:
        _check_header_agrees(base, info, header)
        return info
    return _from_header(base, header)


def _check_header_agrees(
    name: str, info: SpitzerFileInfo, header: Mapping[str, Any] | None
) -> None:
    if header is None:
        return
    telescop = _hget(header, "TELESCOP")
    if telescop is not None and str(telescop).strip().lower() not in SPITZER_TELESCOP:
        raise SpitzerNameMismatchError(
            f"{name} has a Spitzer name but TELESCOP={telescop!r}: rename the file or fix TELESCOP"
        )
    expected = {"CHNLNUM": info.channel, "AORKEY": info.aorkey, "EXPID": info.expid}
    if info.dcenum is not None:
        expected["DCENUM"] = info.dcenum
    for key, value in expected.items():
        got = _hget(header, key)
        if got is not None and int(got) != value:
            raise SpitzerNameMismatchError(
                f"{name}: the name says {key}={value} but the header says {key}={got}; "
                "the file was renamed or its header edited"
            )
    instrume = _hget(header, "INSTRUME")
    if instrume is not None and str(instrume).strip().upper() != info.instrument:
        raise SpitzerNameMismatchError(
            f"{name}: the name says {info.instrument} but INSTRUME={instrume!r}"
        )
    _check_type_agrees(name, info, header)


def _check_type_agrees(name: str, info: SpitzerFileInfo, header: Mapping[str, Any]) -> None:
    """The product type in the name against the header: a Spitzer FILENAME keyword naming
    another type of the same DCE, or (per-DCE BCD-level files) integer data in an image the
    name calls a float product or the reverse, means a renamed file (a bunc saved as
    `_bcd.fits` would otherwise be mosaicked as the BCD)."""
    if info.dcenum is None:
        return
    filename = str(_hget(header, "FILENAME") or "").strip()
    m = _DCE_NAME.match(os.path.basename(filename)) if filename else None
    if m and m["type"].lower() != info.product_type:
        raise SpitzerNameMismatchError(
            f"{name}: the name says '{info.product_type}' but the header's FILENAME is "
            f"{filename!r} ('{m['type'].lower()}'); the file was renamed: give it back its "
            "FILENAME, or fix FILENAME if the header is the wrong one"
        )
    bitpix = _hget(header, "BITPIX")
    naxis = _hget(header, "NAXIS")
    if info.level != "bcd" or bitpix is None or not naxis:
        return  # raw products keep integer counts; no image in the primary HDU: nothing to say
    bscale = _hget(header, "BSCALE")
    # Scaled integers (BSCALE != 1) hold float values; BZERO alone (unsigned masks) does not.
    integer = int(bitpix) > 0 and (bscale is None or float(bscale) == 1.0)
    if integer != (info.product_type in MASK_TYPES):
        what = "a status mask (integer)" if info.product_type in MASK_TYPES else "a float image"
        raise SpitzerNameMismatchError(
            f"{name}: the name says '{info.product_type}', {what}, but the data have "
            f"BITPIX={int(bitpix)}; the file was renamed: give it its own product type's name"
        )


#: Status-mask product types (integer images).
MASK_TYPES = frozenset({"bbmsk", "bmask", "brmsk", "bimsk", "rmask"})
#: Product types a free-form name may carry, longest first ("fbcd" is not read as "bcd").
_TYPE_WORDS = tuple(sorted(BCD_TYPES | RAW_TYPES, key=lambda t: (-len(t), t)))
_FITS_SUFFIX = re.compile(r"\.fits?(\.gz|\.fz)?$", re.IGNORECASE)


def product_type_from_name(name: str) -> str | None:
    """The per-DCE product type a file name carries, or None when it names none or several.

    A Spitzer name gives its type; another name is split into words, and a word that is a
    type, or starts or ends with one ("mybunc_003.fits" -> "bunc"), names it. Case does not
    matter; the result is lower case.
    """
    base = os.path.basename(name.strip())
    m = _DCE_NAME.match(base)
    if m:
        return m["type"].lower()
    words = [w for w in re.split(r"[^a-z0-9]+", _FITS_SUFFIX.sub("", base.lower())) if w]
    found = {w for w in words if w in BCD_TYPES or w in RAW_TYPES}
    if not found:
        for w in words:
            hit = next((t for t in _TYPE_WORDS if w.startswith(t) or w.endswith(t)), None)
            if hit is not None:
                found.add(hit)
    return found.pop() if len(found) == 1 else None


def _from_header(name: str, header: Mapping[str, Any] | None) -> SpitzerFileInfo | None:
    """Recognise a file by its header (its name is not a Spitzer name).

    The product type comes from the FILENAME keyword, else from a type word in the file
    name, else from the data: BUNIT 'DN' is raw, an integer image is a status mask, a float
    image is taken for the BCD (a bunc cannot be told from a BCD by its header alone; two
    files that claim the same BCD are reported by the grouping).
    """
    if header is None:
        return None
    if str(_hget(header, "TELESCOP") or "").strip().lower() not in SPITZER_TELESCOP:
        return None
    inst = str(_hget(header, "INSTRUME") or "").strip().upper()
    if inst not in ("MIPS", "IRAC"):
        return None
    keys = ("CHNLNUM", "AORKEY", "EXPID", "DCENUM")
    vals = [_hget(header, k) for k in keys]
    if any(v is None for v in vals):
        return None
    ch, aor, expid, dce = (int(v) for v in vals)
    bunit = str(_hget(header, "BUNIT") or "").strip()
    filename = str(_hget(header, "FILENAME") or "").strip()
    named = (product_type_from_name(filename) if filename else None) or product_type_from_name(name)
    bitpix = _hget(header, "BITPIX")
    integer = bitpix is not None and int(bitpix) > 0
    level: Level
    if bunit == "DN" or (named in RAW_TYPES and not integer):
        level, ptype = "raw", named if named in RAW_TYPES else "raw"
    elif integer:
        # Integer BCD-level files are the per-DCE status masks.
        level = "bcd"
        default = "bbmsk" if inst == "MIPS" and ch == 1 else "bmask"
        ptype = named if named in MASK_TYPES else default
    else:
        level = "bcd"
        ptype = named if named in BCD_TYPES and named not in MASK_TYPES else "bcd"
    return SpitzerFileInfo(inst, ch, aor, expid, dce, None, level, ptype, False)
