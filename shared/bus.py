"""NATS JetStream plumbing: connection, streams per level, service consumers, KV state.

The only module besides the runtime that knows nats-py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from shared import subjects
from shared.logs import get_logger
from shared.messages import Group

DAY_S = 86400.0


async def connect(url: str, *, name: str, reconnect_forever: bool = True) -> NATS:
    """Connect to NATS; services reconnect forever, command-line clients give up after ~10 s."""
    log = get_logger(name)

    async def on_error(exc: Exception) -> None:
        # reconnects are normal during server restarts and leader elections: log, don't print
        log.warning("nats_error", error=f"{type(exc).__name__}: {exc}")

    async def on_disconnect() -> None:
        log.info("nats_disconnected")

    return await nats.connect(
        url,
        name=name,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        max_reconnect_attempts=-1 if reconnect_forever else 5,
        reconnect_time_wait=1.0,
        connect_timeout=5,
        allow_reconnect=True,
    )


@dataclass(frozen=True, slots=True)
class Topology:
    """Retention and replication of the streams (one per level, plus dead letters)."""

    max_age_s: float = 30 * DAY_S
    max_bytes: int = -1
    replicas: int = 1
    duplicate_window_s: float = 120.0


async def ensure_topology(js: JetStreamContext, topo: Topology = Topology()) -> None:
    """Create or update every stream and KV bucket (idempotent; safe from every replica)."""
    configs = [
        StreamConfig(
            name=subjects.stream_name(level),
            subjects=[subjects.level_subjects(level)],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=topo.max_age_s,
            max_bytes=topo.max_bytes,
            num_replicas=topo.replicas,
            duplicate_window=topo.duplicate_window_s,
        )
        for level in subjects.LEVELS
    ]
    configs.append(
        StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            subjects=[subjects.DEADLETTER_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=topo.max_age_s,
            num_replicas=topo.replicas,
            duplicate_window=topo.duplicate_window_s,
        )
    )
    for cfg in configs:
        try:
            await js.add_stream(cfg)
        except BadRequestError:
            await js.update_stream(cfg)
    for bucket in (subjects.KV_GROUPS, subjects.KV_VERSIONS, subjects.KV_CALIBRATION):
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket, history=1, storage=StorageType.FILE, replicas=topo.replicas
            )
        )


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """Delivery settings of a service's durable consumer (overrides of the server defaults)."""

    ack_wait_s: float = 60.0
    max_deliver: int = 5
    max_ack_pending: int = 256


async def ensure_consumer(
    js: JetStreamContext, service: str, settings: ConsumerSettings
) -> tuple[str, str]:
    """Create or update the service's durable pull consumer; returns (stream, durable)."""
    level = subjects.SERVICE_INPUT[service]
    stream, durable = subjects.stream_name(level), subjects.durable_name(service)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subjects.level_subjects(level),
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            max_ack_pending=settings.max_ack_pending,
        ),
    )
    return stream, durable


# --- key-value state --------------------------------------------------------------------


async def _kv_json(kv: KeyValue, key: str) -> tuple[dict[str, Any] | None, int | None]:
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return None, None
    if entry.value is None:
        return None, entry.revision
    return json.loads(entry.value), entry.revision


async def _kv_cas(kv: KeyValue, key: str, value: dict[str, Any], revision: int | None) -> bool:
    """Write `value` if the key is still at `revision` (None: does not exist). False on a race."""
    data = json.dumps(value, sort_keys=True).encode()
    try:
        if revision is None:
            await kv.create(key, data)
        else:
            await kv.update(key, data, last=revision)
    except (KeyWrongLastSequenceError, BadRequestError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class GroupArrival:
    """What a member's arrival means for its group."""

    complete: bool  #: every member has arrived
    trigger: bool  #: this caller should run the group's work now
    members: dict[int, str]  #: index -> store key of the member's product


class GroupTracker:
    """Which members of a group (an AOR + band, a scan ...) have arrived: JetStream KV, so the
    state survives restarts and is shared by replicas. Updates are compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def arrive(
        self, group: Group, *, version: int, member_key: str, redelivered: bool
    ) -> GroupArrival:
        """Record a member. `trigger` is true for exactly the arrival that completes the group,
        and again for a redelivered message of a complete group whose work is not marked done
        (the first attempt died before finishing)."""
        key = subjects.kv_key("g", group.id, f"v{version}")
        while True:
            state, rev = await _kv_json(self.kv, key)
            state = state or {"count": group.count, "members": {}, "done": False}
            members: dict[str, str] = state["members"]
            was_complete = len(members) >= state["count"]
            if str(group.index) not in members:
                members[str(group.index)] = member_key
                if not await _kv_cas(self.kv, key, state, rev):
                    await asyncio.sleep(0.01)
                    continue
            complete = len(members) >= state["count"]
            trigger = (complete and not was_complete) or (
                complete and redelivered and not state["done"]
            )
            return GroupArrival(
                complete=complete, trigger=trigger, members={int(k): v for k, v in members.items()}
            )

    async def generation(self, group: Group, *, member_key: str) -> int:
        """How many distinct products member `group.index` has brought to the group so far,
        counting this one (1 the first time; the same number again for a redelivery of the same
        `member_key`). Members whose own product versions differ (a band submitted again beside
        one submitted for the first time) still meet in the same generation; a replay of the
        level makes generation 2 of every member."""
        key = subjects.kv_key("g", group.id, "members", group.index)
        while True:
            state, rev = await _kv_json(self.kv, key)
            seen: list[str] = list((state or {}).get("seen", []))
            if member_key in seen:
                return seen.index(member_key) + 1
            seen.append(member_key)
            if await _kv_cas(self.kv, key, {"seen": seen}, rev):
                return len(seen)
            await asyncio.sleep(0.01)

    async def done(self, group_id: str, *, version: int) -> None:
        key = subjects.kv_key("g", group_id, f"v{version}")
        while True:
            state, rev = await _kv_json(self.kv, key)
            if state is None or state["done"]:
                return
            state["done"] = True
            if await _kv_cas(self.kv, key, state, rev):
                return


class VersionRegistry:
    """The Spitzer-style processing counter: version 1 for the first processing of a product
    identity, +1 each time it is reprocessed (a replay or a new submission). A redelivery of
    the same message (same stream sequence, delivery > 1) gets the same version, so it rewrites
    the same object keys."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def version(self, identity: str, *, source: str, redelivered: bool) -> int:
        key = subjects.kv_key("v", identity)
        while True:
            state, rev = await _kv_json(self.kv, key)
            if state is not None and redelivered and state.get("source") == source:
                return int(state["version"])
            new = 1 if state is None else int(state["version"]) + 1
            if await _kv_cas(self.kv, key, {"version": new, "source": source}, rev):
                return new
            await asyncio.sleep(0.01)


class CalibrationRegistry:
    """Calibration files known to the pipeline: (instrument, channel, caltype) -> store key."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def register(self, instrument: str, channel: int, caltype: str, store_key: str) -> None:
        await self.kv.put(subjects.kv_key("cal", instrument, channel, caltype), store_key.encode())

    async def lookup(self, instrument: str, channel: int) -> dict[str, str]:
        """caltype -> store key for one instrument channel."""
        prefix = subjects.kv_key("cal", instrument, channel) + "."
        try:
            keys = await self.kv.keys()
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return {}
        out: dict[str, str] = {}
        for k in keys:
            if k.startswith(prefix):
                entry = await self.kv.get(k)
                if entry.value:
                    out[k[len(prefix) :]] = entry.value.decode()
        return out
