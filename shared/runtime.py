"""The service base: consume -> process -> store -> publish -> ack, once for every service.

A service subclasses `Service` and implements `handle(message, ctx)`; everything else (the
durable consumer, batches, heartbeats, writing products before publishing them, dead letters,
back-off, graceful shutdown, one log line per message) lives here.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgspec
import nats.errors
from astropy.io import fits
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, fitsio, messages, subjects
from shared.errors import BadData, Skip, Transient
from shared.logs import get_logger
from shared.messages import DeadLetter, Envelope, Group, ObsId, ProductRef, StoredObject
from shared.store import ObjectStore, validate_key

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """How a service consumes: batch size, timeouts, retry policy."""

    batch: int = 4
    fetch_timeout_s: float = 1.0
    consumer: bus.ConsumerSettings = field(default_factory=bus.ConsumerSettings)
    backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)
    topology: bus.Topology = field(default_factory=bus.Topology)


@dataclass(slots=True)
class ProductFile:
    """One file of a product to write: its role within the product, mission name and bytes."""

    role: str
    name: str
    data: bytes

    @classmethod
    def fits(cls, role: str, name: str, hdul: fits.HDUList) -> ProductFile:
        return cls(role=role, name=name, data=fitsio.to_bytes(hdul))


@dataclass(slots=True)
class ProductOut:
    """A product a service made: written to the store, then announced on its level's subject.

    The first file is the primary one; the others become companions. Keys are
    `<instrument>/<level>/<subdir>/<name>`: deterministic from identity and version.
    """

    instrument: str
    level: subjects.Level
    product_type: str
    obs: ObsId
    files: list[ProductFile]
    subdir: str
    version: int = 1
    parents: tuple[str, ...] = ()
    group: Group | None = None
    meta: dict[str, str | int | float | bool] = field(default_factory=dict)


class Context:
    """What a service's `handle` may use for one message."""

    def __init__(self, runner: ServiceRunner, msg: Msg | None, run_id: str = "") -> None:
        self._runner = runner
        self.store: ObjectStore = runner.store
        self.log = get_logger(runner.service.name)
        self.run_id = run_id
        meta = msg.metadata if msg is not None else None
        self.stream_seq = int(meta.sequence.stream) if meta else 0
        self.redelivered = bool(meta and meta.num_delivered > 1)
        self._source = f"{meta.stream if meta else '-'}:{self.stream_seq}"
        self.outputs: list[ProductRef] = []
        self.dead_letters: list[DeadLetter] = []
        self._after_publish: list[tuple[str, int]] = []

    async def read(self, key: str) -> bytes:
        try:
            return await self.store.get(key)
        except FileNotFoundError as exc:
            raise BadData(f"input object {key} is not in the store") from exc

    async def read_fits(self, key: str) -> fits.HDUList:
        data = await self.read(key)
        return await asyncio.to_thread(fitsio.open_bytes, data)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run pure science in a worker thread, so the loop keeps heart-beating the message."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def version(self, identity: str) -> int:
        """Processing counter of a product identity (1 first, +1 per reprocessing)."""
        return await self._runner.versions.version(
            identity, source=self._source, redelivered=self.redelivered
        )

    async def arrive(self, group: Group, *, version: int, member_key: str) -> bus.GroupArrival:
        return await self._runner.groups.arrive(
            group, version=version, member_key=member_key, redelivered=self.redelivered
        )

    async def generation(self, group: Group, *, member_key: str) -> int:
        """This member's generation in `group` (see `bus.GroupTracker.generation`): use it as
        the `version` of `arrive` where members' product versions may differ."""
        return await self._runner.groups.generation(group, member_key=member_key)

    def group_done_after_publish(self, group_id: str, version: int) -> None:
        self._after_publish.append((group_id, version))

    @property
    def calibration(self) -> bus.CalibrationRegistry:
        return self._runner.calibration

    async def emit(self, out: ProductOut) -> ProductRef:
        """Write every file of the product to the store now; publish its reference after
        `handle` returns (and before the input is acknowledged)."""
        if not out.files:
            raise ValueError("a product needs at least one file")
        stored: list[StoredObject] = []
        for f in out.files:
            key = validate_key(f"{out.instrument.lower()}/{out.level.value}/{out.subdir}/{f.name}")
            stored.append(await self.store.put(key, f.data, role=f.role, name=f.name))
        first = stored[0]
        ref = ProductRef(
            instrument=out.instrument,
            level=out.level.value,
            product_type=out.product_type,
            obs=out.obs,
            key=first.key,
            size=first.size,
            sha256=first.sha256,
            version=out.version,
            parents=out.parents,
            group=out.group,
            companions=tuple(stored[1:]),
            run_id=self.run_id,
            meta=out.meta,
            created=messages.utcnow(),
        )
        self.outputs.append(ref)
        return ref

    def dead_letter(self, reason: str, *, item: str = "", original: bytes = b"") -> None:
        """Report a part of this message that cannot be processed (the rest goes on)."""
        self.log.warning("dead_letter", reason=reason, item=item)
        self.dead_letters.append(
            DeadLetter(
                service=self._runner.service.name,
                reason=reason,
                outcome="bad_data",
                stream_seq=self.stream_seq,
                item=item,
                original=original,
                run_id=self.run_id,
                time=messages.utcnow(),
            )
        )


class Service(abc.ABC):
    """One skybus service: which level it consumes and what it does with one message."""

    name: ClassVar[str]
    #: the service's closed config Struct type, and the loaded instance
    Config: ClassVar[type[msgspec.Struct]]
    config: msgspec.Struct

    def __init__(self, config: msgspec.Struct) -> None:
        self.config = config

    async def prepare(self, log: Any) -> None:
        """Work done once per replica before its first message (e.g. compiling kernels), after
        the consumer is bound: messages wait in the stream meanwhile. Default: nothing."""
        return None

    @abc.abstractmethod
    async def handle(self, message: Envelope, ctx: Context) -> None:
        """Process one message: read inputs, run science (`ctx.run`), `ctx.emit` products.

        Raise `Skip`, `BadData` (or `ValueError` from science) or `Transient`; see `shared.errors`.
        """


class ServiceRunner:
    """Runs one service replica against a NATS server and a store until `stop` is set."""

    def __init__(
        self,
        service: Service,
        *,
        nats_url: str,
        store: ObjectStore,
        settings: RuntimeSettings = RuntimeSettings(),
    ) -> None:
        self.service = service
        self.nats_url = nats_url
        self.store = store
        self.settings = settings
        self.log = get_logger(service.name)
        self.processed = 0
        self.ready = asyncio.Event()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None

    # nats objects exist only while running
    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "runner not started"
        return self._js

    async def run(self, stop: asyncio.Event) -> None:
        name = self.service.name
        nc = await bus.connect(self.nats_url, name=f"skybus-{name}")
        self._nc, self._js = nc, nc.jetstream()
        js = self._js
        await bus.ensure_topology(js, self.settings.topology)
        stream, durable = await bus.ensure_consumer(js, name, self.settings.consumer)
        self.groups = bus.GroupTracker(await js.key_value(subjects.KV_GROUPS))
        self.versions = bus.VersionRegistry(await js.key_value(subjects.KV_VERSIONS))
        self.calibration = bus.CalibrationRegistry(await js.key_value(subjects.KV_CALIBRATION))
        self._stream = stream
        sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
        adv = await nc.subscribe(
            subjects.max_deliveries_advisory(stream, durable),
            queue=f"{durable}-advisories",
            cb=self._on_max_deliveries,
        )
        self.log.info(
            "service_started",
            stream=stream,
            durable=durable,
            nats=self.nats_url,
            store=self.store.url,
            batch=self.settings.batch,
            max_deliver=self.settings.consumer.max_deliver,
        )
        self.ready.set()
        try:
            await self.service.prepare(self.log)
            while not stop.is_set():
                try:
                    batch = await sub.fetch(
                        self.settings.batch, timeout=self.settings.fetch_timeout_s
                    )
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
                    await asyncio.sleep(0.5)
                    continue
                await self._process_batch(batch, stop)
        finally:
            # unsubscribe pull subscriptions before drain, or drain waits its whole timeout
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await adv.unsubscribe()
            with contextlib.suppress(Exception):
                await nc.drain()
            self.log.info("service_stopped", processed=self.processed)

    async def _process_batch(self, batch: list[Msg], stop: asyncio.Event) -> None:
        pending = list(batch)
        beat = asyncio.create_task(self._heartbeat(pending))
        try:
            while pending:
                msg = pending[0]
                if stop.is_set():
                    # shutting down: hand the rest back at once for another replica
                    with contextlib.suppress(Exception):
                        await msg.nak()
                else:
                    await self._process(msg)
                pending.pop(0)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeat(self, pending: list[Msg]) -> None:
        interval = max(self.settings.consumer.ack_wait_s / 3.0, 0.5)
        while True:
            await asyncio.sleep(interval)
            for msg in list(pending):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _process(self, msg: Msg) -> None:
        t0 = time.perf_counter()
        meta = msg.metadata
        log = self.log.bind(
            subject=msg.subject, stream_seq=meta.sequence.stream, delivery=meta.num_delivered
        )
        try:
            envelope = messages.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reason = f"malformed message, not a skybus wire message: {exc}"
            await self._publish_dead(self._dead_letter_of(msg, reason, "bad_message"))
            await msg.term()
            log.warning(
                "message",
                outcome="bad_message",
                reason=reason,
                seconds=round(time.perf_counter() - t0, 3),
            )
            return
        run_id = getattr(envelope, "run_id", "")
        ids = msgspec.to_builtins(envelope.obs) if isinstance(envelope, ProductRef) else {}
        log = log.bind(run_id=run_id, **ids)
        ctx = Context(self, msg, run_id=run_id)
        outcome, reason = "ok", ""
        try:
            await self.service.handle(envelope, ctx)
            await self._publish_outputs(ctx)
            await msg.ack_sync()
        except Skip as exc:
            outcome, reason = "skipped", str(exc)
            await msg.ack()
        except (BadData, ValueError) as exc:
            outcome, reason = "bad_data", str(exc) or type(exc).__name__
            # the items found bad before the whole message failed keep their own reasons
            for dl in ctx.dead_letters:
                await self._publish_dead(dl)
            await self._publish_dead(self._dead_letter_of(msg, reason, "bad_data", run_id))
            await msg.term()
        except (Transient, ConnectionError, TimeoutError, nats.errors.Error) as exc:
            outcome, reason = "retry", f"{type(exc).__name__}: {exc}"
            await self._nak(msg)
        except Exception as exc:  # a bug: loud, but the message is retried then dead-lettered
            outcome, reason = "error", f"{type(exc).__name__}: {exc}"
            log.exception("service_error")
            await self._nak(msg)
        self.processed += 1
        log.info(
            "message",
            outcome=outcome,
            reason=reason or None,
            products=[r.key for r in ctx.outputs],
            dead_letters=len(ctx.dead_letters),
            seconds=round(time.perf_counter() - t0, 3),
        )

    async def _nak(self, msg: Msg) -> None:
        attempt = max(msg.metadata.num_delivered - 1, 0)
        delays = self.settings.backoff_s
        with contextlib.suppress(Exception):
            await msg.nak(delay=delays[min(attempt, len(delays) - 1)])

    async def _publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish with dedup id; retry briefly through leader elections."""
        for attempt in range(6):
            try:
                await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=5)
                return
            except (
                nats.errors.NoRespondersError,
                nats.errors.TimeoutError,
                nats.js.errors.ServiceUnavailableError,
            ):
                await asyncio.sleep(0.2 * 2**attempt)
        raise Transient(f"could not publish to {subject}")

    async def _publish_outputs(self, ctx: Context) -> None:
        for ref in ctx.outputs:
            subject = subjects.product_subject(ref.level, ref.instrument, ref.product_type)
            await self._publish(subject, messages.encode(ref), msg_id=ref.key)
        for dl in ctx.dead_letters:
            await self._publish_dead(dl)
        for group_id, version in ctx._after_publish:
            await self.groups.done(group_id, version=version)

    def _dead_letter_of(
        self, msg: Msg, reason: str, outcome: str, run_id: str = ""
    ) -> DeadLetter:
        """The dead letter of a whole message (its subject, sequence and bytes kept)."""
        return DeadLetter(
            service=self.service.name,
            reason=reason,
            outcome=outcome,
            subject=msg.subject,
            stream_seq=msg.metadata.sequence.stream,
            original=msg.data,
            run_id=run_id,
            time=messages.utcnow(),
        )

    async def _publish_dead(self, dl: DeadLetter) -> None:
        # one message may report several problems: each is its own dead letter, and a retry
        # of the same message reports the same ones again (deduplicated)
        digest = hashlib.sha256(f"{dl.item}\n{dl.reason}".encode()).hexdigest()[:16]
        msg_id = f"dl:{dl.service}:{dl.outcome}:{dl.stream_seq}:{digest}"
        await self._publish(subjects.deadletter_subject(dl.service), messages.encode(dl), msg_id)

    async def _on_max_deliveries(self, adv: Msg) -> None:
        try:
            info = json.loads(adv.data)
            seq = int(info["stream_seq"])
            original = await self.js.get_msg(self._stream, seq)
            await self._publish_dead(
                DeadLetter(
                    service=self.service.name,
                    reason=(
                        f"gave up after {info.get('deliveries', '?')} deliveries "
                        f"(max_deliver={self.settings.consumer.max_deliver}); the service logs "
                        f"for stream_seq {seq} say why; fix and resubmit or replay"
                    ),
                    outcome="max_deliver",
                    subject=original.subject or "",
                    stream_seq=seq,
                    original=original.data or b"",
                    time=messages.utcnow(),
                )
            )
        except Exception:
            self.log.exception("advisory_failed")


def stop_on_signals() -> asyncio.Event:
    """An Event set by SIGTERM or SIGINT: the runner then finishes the message in hand,
    hands the rest of its batch back, unsubscribes and drains."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def run_services(runners: list[ServiceRunner], stop: asyncio.Event) -> None:
    """Run several service replicas in one process until `stop` is set."""
    tasks = [asyncio.create_task(r.run(stop), name=r.service.name) for r in runners]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
