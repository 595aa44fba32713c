"""A minimal service for testing the runtime (not a mock: it runs on the real runtime, bus and
store). It consumes telemetry-level references and writes one decoded product per input.

Input bytes select the behaviour: `BAD...` is rejected as bad data, `PARTBAD...` reports a
bad part, then is rejected as a whole, `BUG...` raises a bug,
`SLOW<seconds>` writes its product, then works for that long before returning.

Run as a process: `python -m tests.platform.echo_service NATS_URL STORE_DIR [ACK_WAIT_S]`.
"""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec

from shared import bus, subjects
from shared.messages import Envelope, ObsId, ProductRef
from shared.runtime import (
    Context,
    ProductFile,
    ProductOut,
    RuntimeSettings,
    Service,
    ServiceRunner,
    stop_on_signals,
)
from shared.store import ObjectStore


class EchoService(Service):
    name = "decode"

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        pass

    def __init__(self, work_s: float = 0.0) -> None:
        super().__init__(self.Config())
        self.work_s = work_s
        self.handled = 0

    async def handle(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message, ProductRef)
        data = await ctx.read(message.key)
        if data.startswith(b"PARTBAD"):
            ctx.dead_letter("part 1 of the input is bad", item="part-1")
            raise ValueError(f"input {message.key}: nothing usable is left")
        if data.startswith(b"BAD"):
            raise ValueError(f"input {message.key} is rejected: it starts with BAD")
        if data.startswith(b"BUG"):
            raise RuntimeError("a bug in the service")
        identity = f"echo.{message.obs.scan}"
        version = await ctx.version(identity)
        await ctx.emit(
            ProductOut(
                instrument="TEST",
                level=subjects.Level.DECODED,
                product_type="echo",
                obs=ObsId(scan=message.obs.scan),
                subdir=f"scan{message.obs.scan}",
                files=[ProductFile("echo", f"echo_{message.obs.scan}_v{version}.dat", data[::-1])],
                version=version,
                parents=(message.key,),
            )
        )
        if data.startswith(b"SLOW"):
            await asyncio.sleep(float(data[4:].split(b";")[0]))
        elif self.work_s:
            await ctx.run(time.sleep, self.work_s)
        self.handled += 1


def settings(ack_wait_s: float = 30.0, max_deliver: int = 5, batch: int = 1) -> RuntimeSettings:
    return RuntimeSettings(
        batch=batch,
        fetch_timeout_s=0.5,
        backoff_s=(0.2,),
        consumer=bus.ConsumerSettings(ack_wait_s=ack_wait_s, max_deliver=max_deliver),
    )


async def _main(url: str, store_dir: str, ack_wait_s: float) -> None:
    runner = ServiceRunner(
        EchoService(), nats_url=url, store=ObjectStore(store_dir), settings=settings(ack_wait_s)
    )
    await runner.run(stop_on_signals())


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 30.0))
