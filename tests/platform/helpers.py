"""Test helpers that talk to a real bus: publish inputs, read streams back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext

from shared import bus, messages, subjects
from shared.messages import Envelope, ObsId, ProductRef
from shared.store import ObjectStore


async def publish_chunk(
    js: JetStreamContext, store: ObjectStore, scan: int, payload: bytes
) -> ProductRef:
    obj = await store.put(f"test/telemetry/chunk_{scan}.bin", payload)
    ref = ProductRef(
        instrument="TEST",
        level="telemetry",
        product_type="chunk",
        obs=ObsId(scan=scan),
        key=obj.key,
        size=obj.size,
        sha256=obj.sha256,
    )
    await js.publish(subjects.product_subject("telemetry", "test", "chunk"), messages.encode(ref))
    return ref


async def stream_messages(js: JetStreamContext, stream: str) -> list[tuple[str, Envelope | bytes]]:
    """Every message of a stream, decoded where possible."""
    info = await js.stream_info(stream)
    out: list[tuple[str, Envelope | bytes]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await js.get_msg(stream, seq)
        except Exception:
            continue
        try:
            out.append((raw.subject or "", messages.decode(raw.data or b"")))
        except Exception:
            out.append((raw.subject or "", raw.data or b""))
    return out


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout_s} s")


async def setup_bus(url: str) -> tuple[object, JetStreamContext]:
    nc = await bus.connect(url, name="test", reconnect_forever=False)
    js = nc.jetstream()
    await bus.ensure_topology(js)
    return nc, js
