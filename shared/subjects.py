"""Subject, stream, consumer and bucket names of the skybus bus, in one place.

One subject tree and one LIMITS-retention, file-storage stream per product level:

    skybus.input.<instrument>.<type>        SKYBUS_INPUT       files submitted (`skybus run`)
    skybus.telemetry.<instrument>.<type>    SKYBUS_TELEMETRY   telemetry chunks, one per observation
    skybus.decoded.<instrument>.<type>      SKYBUS_DECODED     ERD, Level 1a tables, raw frames
    skybus.calibrated.<instrument>.<type>   SKYBUS_CALIBRATED  BCD, SPD, Level 1b..1g
    skybus.mosaicked.<instrument>.<type>    SKYBUS_MOSAICKED   post-BCD mosaics, CMOS, Level 2
    skybus.sources.<instrument>.<type>      SKYBUS_SOURCES     source lists, band-merged lists
    skybus.deadletter.<service>             SKYBUS_DEADLETTER  what could not be processed, and why
"""

from __future__ import annotations

import enum
import re

PREFIX = "skybus"


class Level(enum.StrEnum):
    """Product levels, in pipeline order."""

    INPUT = "input"
    TELEMETRY = "telemetry"
    DECODED = "decoded"
    CALIBRATED = "calibrated"
    MOSAICKED = "mosaicked"
    SOURCES = "sources"


LEVELS: tuple[Level, ...] = tuple(Level)


def stream_name(level: Level | str) -> str:
    """JetStream stream holding one product level, e.g. `SKYBUS_CALIBRATED`."""
    return f"SKYBUS_{Level(level).value.upper()}"


def level_subjects(level: Level | str) -> str:
    """Wildcard of every subject of one level, e.g. `skybus.calibrated.>`."""
    return f"{PREFIX}.{Level(level).value}.>"


_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def product_subject(level: Level | str, instrument: str, product_type: str) -> str:
    """Subject of one product kind, e.g. `skybus.calibrated.mips.bcd`."""
    inst, kind = instrument.lower(), product_type.lower()
    for token in (inst, kind):
        if not _TOKEN.match(token):
            raise ValueError(f"subject token {token!r} must match [A-Za-z0-9_-]+")
    return f"{PREFIX}.{Level(level).value}.{inst}.{kind}"


DEADLETTER_STREAM = "SKYBUS_DEADLETTER"
DEADLETTER_SUBJECTS = f"{PREFIX}.deadletter.>"


def deadletter_subject(service: str) -> str:
    """Dead-letter subject of one service, e.g. `skybus.deadletter.calibrate`."""
    return f"{PREFIX}.deadletter.{service}"


#: service -> the level it consumes. Each service has one durable pull consumer of that name
#: on that level's stream; replicas of a service bind the same durable and share its work.
SERVICE_INPUT: dict[str, Level] = {
    "ingest": Level.INPUT,
    "decode": Level.TELEMETRY,
    "calibrate": Level.DECODED,
    "mosaic": Level.CALIBRATED,
    "extract": Level.MOSAICKED,
}
SERVICES: tuple[str, ...] = tuple(SERVICE_INPUT)


def durable_name(service: str) -> str:
    """Durable consumer name of a service (shared by its replicas)."""
    if service not in SERVICE_INPUT:
        raise ValueError(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    return f"skybus-{service}"


def max_deliveries_advisory(stream: str, durable: str) -> str:
    """Server advisory published when a message hits the consumer's `max_deliver`."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"


#: JetStream key-value buckets: aggregation state that survives restarts and is shared by replicas.
KV_GROUPS = "skybus_groups"  #: which members of a group (AOR + band, scan ...) have arrived
KV_VERSIONS = "skybus_versions"  #: processing counter per product identity (Spitzer "version")
KV_CALIBRATION = "skybus_calibration"  #: calibration files known to the pipeline

_KV_BAD = re.compile(r"[^-/_=.a-zA-Z0-9]")


def kv_key(*parts: object) -> str:
    """A valid KV key from identity parts (characters outside [-/_=.a-zA-Z0-9] become '_')."""
    return _KV_BAD.sub("_", ".".join(str(p) for p in parts))
