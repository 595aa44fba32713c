"""Wire messages of the skybus bus: msgspec Structs that point at products, never carry pixels.

Wire structs are open (unknown fields are ignored) so that new fields can be added last with
defaults without breaking older readers.
"""

from __future__ import annotations

import datetime as _dt

import msgspec


class StoredObject(msgspec.Struct, frozen=True, kw_only=True):
    """One object in the product store."""

    key: str  #: object-store key, deterministic from the product identity and version
    size: int  #: bytes
    sha256: str  #: hex digest of the bytes
    role: str = "primary"  #: what this file is within its product ("bcd", "bunc", "bbmsk", ...)
    name: str = ""  #: the mission's file name (Spitzer, ISO, TAUVEX naming rules)


class Group(msgspec.Struct, frozen=True):
    """Membership of a product in a group that a downstream service waits for (an AOR + band,
    a TAUVEX scan ...): `index` in 0..count-1."""

    id: str
    index: int
    count: int

    @classmethod
    def aor_mosaics(cls, instrument: str, aorkey: int, channel: int,
                    channels: tuple[int, ...] | list[int], run_id: str) -> Group:
        """The band-merge group of one submission's mosaics of an AOR: one member per channel
        of `channels` (mosaics made by skybus and archive mosaics entered by ingest meet in
        it; extract counts replays by generation)."""
        return cls(f"{instrument}-{aorkey}-mosaics-{run_id or 'norun'}",
                   list(channels).index(channel) if channel in channels else 0, len(channels))


class ObsId(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Observation identifiers; which are set depends on the mission."""

    aorkey: int | None = None  #: Spitzer AOR key
    channel: int | None = None  #: Spitzer CHNLNUM
    expid: int | None = None
    dcenum: int | None = None
    obsnum: str | None = None  #: ISO observation number (revolution 3 digits + 5)
    revolution: int | None = None
    scan: int | None = None  #: TAUVEX scan / observation index
    telescope: int | None = None  #: TAUVEX T1..T3


class ProductRef(msgspec.Struct, frozen=True, kw_only=True, tag="product"):
    """A product that exists in the store: what it is, where it is, where it came from."""

    instrument: str  #: "MIPS", "TAUVEX", "ISOCAM", or the INSTRUME of foreign files
    level: str  #: a `shared.subjects.Level` value
    product_type: str  #: "dce", "raw", "bcd", "maic", "level1a", "sources", "bandmerged" ...
    obs: ObsId
    key: str
    size: int
    sha256: str
    version: int = 1  #: processing counter of this product identity, 1 for the first processing
    parents: tuple[str, ...] = ()  #: store keys of the inputs (provenance)
    group: Group | None = None
    companions: tuple[StoredObject, ...] = ()  #: other files of the product (bunc, bbmsk ...)
    run_id: str = ""  #: the submission this product descends from
    meta: dict[str, str | int | float | bool] = {}
    created: str = ""  #: ISO UTC time the product was written

    @property
    def primary(self) -> StoredObject:
        return StoredObject(key=self.key, size=self.size, sha256=self.sha256)

    def file(self, role: str) -> StoredObject | None:
        """The companion file with this role, or None."""
        for obj in self.companions:
            if obj.role == role:
                return obj
        return None


class Submission(msgspec.Struct, frozen=True, kw_only=True, tag="submission"):
    """Input files placed in the store by `skybus run` (or any client) for ingest: listed in
    `files`, or, for a submission too large for one bus message (~4000 files pass NATS's
    1 MiB payload limit), in `manifest`: a JSON array of the StoredObjects in the store
    (`encode_file_list`)."""

    run_id: str
    files: tuple[StoredObject, ...] = ()
    manifest: StoredObject | None = None
    submitted: str = ""


_file_list_decoder = msgspec.json.Decoder(tuple[StoredObject, ...])


def encode_file_list(files: tuple[StoredObject, ...]) -> bytes:
    """A submission's manifest: the files as a JSON array."""
    return msgspec.json.encode(files)


def decode_file_list(data: bytes) -> tuple[StoredObject, ...]:
    """The files of a submission's manifest; raises msgspec errors on a bad one."""
    return _file_list_decoder.decode(data)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag="deadletter"):
    """What a service could not process, with the reason and the original message."""

    service: str
    reason: str  #: human-readable: what is wrong and what to do
    outcome: str  #: "bad_data", "bad_message", "max_deliver"
    subject: str = ""  #: subject of the original message
    stream_seq: int = 0
    original: bytes = b""  #: the original message payload, as received
    item: str = ""  #: the part that failed within a message (a file, a DCE), if not all of it
    run_id: str = ""
    time: str = ""


Envelope = ProductRef | Submission | DeadLetter

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def encode(message: Envelope) -> bytes:
    """JSON bytes of a wire message (readable with `nats sub`)."""
    return _encoder.encode(message)


def decode(data: bytes) -> Envelope:
    """Parse a wire message; raises `msgspec.ValidationError`/`DecodeError` on bad input."""
    return _decoder.decode(data)


def utcnow() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
