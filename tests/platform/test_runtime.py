"""The service runtime on a real nats-server: outcomes, dead letters, replicas, crash safety."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from shared import subjects
from shared.embedded import EmbeddedNats
from shared.messages import DeadLetter, ProductRef
from shared.runtime import ServiceRunner
from shared.store import ObjectStore
from tests.platform.echo_service import EchoService, settings
from tests.platform.helpers import publish_chunk, setup_bus, stream_messages, wait_for

DECODED = subjects.stream_name("decoded")


async def _consumer_idle(js, service: str = "decode") -> bool:
    stream = subjects.stream_name(subjects.SERVICE_INPUT[service])
    info = await js.consumer_info(stream, subjects.durable_name(service))
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_products_written_then_published(
    nats_server: EmbeddedNats, store: ObjectStore
) -> None:
    nc, js = await setup_bus(nats_server.url)
    stop = asyncio.Event()
    runner = ServiceRunner(
        EchoService(), nats_url=nats_server.url, store=store, settings=settings()
    )
    task = asyncio.create_task(runner.run(stop))
    for scan in range(3):
        await publish_chunk(js, store, scan, f"payload {scan}".encode())

    async def three() -> bool:
        return len(await stream_messages(js, DECODED)) == 3

    await wait_for(three)
    for _, ref in await stream_messages(js, DECODED):
        assert isinstance(ref, ProductRef)
        assert await store.verify(ref.primary), f"{ref.key} missing or wrong sha256"
        assert ref.version == 1 and ref.parents
    stop.set()
    await task
    await nc.drain()


async def test_bad_inputs_dead_lettered_good_ones_processed(
    nats_server: EmbeddedNats, store: ObjectStore
) -> None:
    nc, js = await setup_bus(nats_server.url)
    await js.publish("skybus.telemetry.test.chunk", b"{this is not json")
    await publish_chunk(js, store, 1, b"BAD frame")
    for scan in (2, 3, 4):
        await publish_chunk(js, store, scan, b"good")
    stop = asyncio.Event()
    runner = ServiceRunner(
        EchoService(), nats_url=nats_server.url, store=store, settings=settings()
    )
    task = asyncio.create_task(runner.run(stop))

    async def settled() -> bool:
        return (
            len(await stream_messages(js, subjects.DEADLETTER_STREAM)) == 2
            and len(await stream_messages(js, DECODED)) == 3
        )

    await wait_for(settled)
    dead = [m for _, m in await stream_messages(js, subjects.DEADLETTER_STREAM)]
    assert all(isinstance(d, DeadLetter) for d in dead)
    reasons = sorted((d.outcome, d.reason) for d in dead)  # type: ignore[union-attr]
    assert reasons[0][0] == "bad_data" and "starts with BAD" in reasons[0][1]
    assert reasons[1][0] == "bad_message" and "malformed" in reasons[1][1]
    assert dead[0].original  # type: ignore[union-attr]
    produced = sorted(m.obs.scan for _, m in await stream_messages(js, DECODED))  # type: ignore[union-attr]
    assert produced == [2, 3, 4]
    stop.set()
    await task
    await nc.drain()


async def test_parts_reported_before_the_whole_failed_keep_their_reasons(
    nats_server: EmbeddedNats, store: ObjectStore
) -> None:
    """A message whose handler dead-letters one item, then rejects the whole: both reasons
    reach the dead-letter subject (the item's is not lost with the message)."""
    nc, js = await setup_bus(nats_server.url)
    await publish_chunk(js, store, 7, b"PARTBAD data")
    stop = asyncio.Event()
    runner = ServiceRunner(
        EchoService(), nats_url=nats_server.url, store=store, settings=settings()
    )
    task = asyncio.create_task(runner.run(stop))

    async def two() -> bool:
        return len(await stream_messages(js, subjects.DEADLETTER_STREAM)) == 2

    await wait_for(two)
    dead = [m for _, m in await stream_messages(js, subjects.DEADLETTER_STREAM)]
    reasons = sorted(d.reason for d in dead)  # type: ignore[union-attr]
    assert "nothing usable is left" in reasons[0] and reasons[1] == "part 1 of the input is bad"
    assert [d.item for d in dead if d.reason.startswith("part")] == ["part-1"]  # type: ignore[union-attr]
    stop.set()
    await task
    await nc.drain()


async def test_bug_dead_lettered_after_max_deliver(
    nats_server: EmbeddedNats, store: ObjectStore
) -> None:
    nc, js = await setup_bus(nats_server.url)
    await publish_chunk(js, store, 7, b"BUG here")
    await publish_chunk(js, store, 8, b"good")
    stop = asyncio.Event()
    runner = ServiceRunner(
        EchoService(), nats_url=nats_server.url, store=store, settings=settings(max_deliver=2)
    )
    task = asyncio.create_task(runner.run(stop))

    async def dead_lettered() -> bool:
        return len(await stream_messages(js, subjects.DEADLETTER_STREAM)) == 1

    await wait_for(dead_lettered)
    ((_, dead),) = await stream_messages(js, subjects.DEADLETTER_STREAM)
    assert isinstance(dead, DeadLetter) and dead.outcome == "max_deliver"
    assert "2 deliveries" in dead.reason and dead.original
    assert [m.obs.scan for _, m in await stream_messages(js, DECODED)] == [8]  # type: ignore[union-attr]
    stop.set()
    await task
    await nc.drain()


async def test_two_replicas_share_the_consumer(
    nats_server: EmbeddedNats, store: ObjectStore
) -> None:
    nc, js = await setup_bus(nats_server.url)
    for scan in range(12):
        await publish_chunk(js, store, scan, b"work")
    stop = asyncio.Event()
    services = [EchoService(work_s=0.15), EchoService(work_s=0.15)]
    runners = [
        ServiceRunner(s, nats_url=nats_server.url, store=store, settings=settings())
        for s in services
    ]
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]

    async def all_done() -> bool:
        return len(await stream_messages(js, DECODED)) == 12

    await wait_for(all_done)
    assert sum(s.handled for s in services) == 12
    assert all(s.handled > 0 for s in services), [s.handled for s in services]
    stop.set()
    await asyncio.gather(*tasks)
    await nc.drain()


async def test_sigkill_while_holding_a_message(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = ObjectStore(str(store_dir))
    nc, js = await setup_bus(nats_server.url)
    cmd = [
        sys.executable,
        "-m",
        "tests.platform.echo_service",
        nats_server.url,
        str(store_dir),
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env)
    try:
        await publish_chunk(js, store, 42, b"SLOW30;")

        async def holding() -> bool:  # the product is written, the message not yet acked
            return bool(await store.list("test/decoded/scan42"))

        await wait_for(holding)
        info = await js.consumer_info(subjects.stream_name("telemetry"), "skybus-decode")
        assert info.num_ack_pending == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # the same input redelivered to a restarted service: this time it is quick
        key = (await stream_messages(js, subjects.stream_name("telemetry")))[0][1].key  # type: ignore[union-attr]
        await store.put(key, b"quick now")
        proc = subprocess.Popen(cmd, env=env)

        async def finished() -> bool:
            return await _consumer_idle(js) and len(await stream_messages(js, DECODED)) >= 1

        await wait_for(finished, timeout_s=30)
        outputs = await stream_messages(js, DECODED)
        assert len(outputs) == 1, outputs
        assert await store.list("test/decoded/scan42") == ["test/decoded/scan42/echo_42_v1.dat"]
        ref = outputs[0][1]
        assert isinstance(ref, ProductRef) and await store.verify(ref.primary)
    finally:
        proc.kill()
        proc.wait()
    await nc.drain()


async def test_replay_bumps_version(nats_server: EmbeddedNats, store: ObjectStore) -> None:
    nc, js = await setup_bus(nats_server.url)
    await publish_chunk(js, store, 5, b"data")
    stop = asyncio.Event()
    runner = ServiceRunner(
        EchoService(), nats_url=nats_server.url, store=store, settings=settings()
    )
    task = asyncio.create_task(runner.run(stop))

    async def n_outputs(n: int) -> bool:
        return len(await stream_messages(js, DECODED)) == n

    await wait_for(lambda: n_outputs(1))
    await js.reset_consumer(subjects.stream_name("telemetry"), "skybus-decode", seq=1)
    await wait_for(lambda: n_outputs(2))
    versions = [m.version for _, m in await stream_messages(js, DECODED)]  # type: ignore[union-attr]
    assert versions == [1, 2]
    assert await store.list("test/decoded/scan5") == [
        "test/decoded/scan5/echo_5_v1.dat",
        "test/decoded/scan5/echo_5_v2.dat",
    ]
    stop.set()
    await task
    await nc.drain()


async def test_sigterm_finishes_the_message_in_hand(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    store = ObjectStore(str(store_dir))
    nc, js = await setup_bus(nats_server.url)
    cmd = [sys.executable, "-m", "tests.platform.echo_service", nats_server.url, str(store_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env)
    try:
        await publish_chunk(js, store, 9, b"SLOW2;")

        async def holding() -> bool:
            return bool(await store.list("test/decoded/scan9"))

        await wait_for(holding)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        # finished, published and acknowledged before exiting
        assert await _consumer_idle(js)
        outputs = await stream_messages(js, DECODED)
        assert [m.obs.scan for _, m in outputs] == [9]  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
    await nc.drain()
