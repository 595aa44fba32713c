"""The `skybus` command: help texts, start-up errors, status and replay on a real server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import subjects
from shared.embedded import EmbeddedNats
from shared.runtime import ServiceRunner
from shared.store import ObjectStore
from tests.platform.echo_service import EchoService, settings
from tests.platform.helpers import publish_chunk, setup_bus, stream_messages, wait_for

ROOT = Path(__file__).resolve().parents[2]


def skybus(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("command", ["", "serve", "up", "run", "demo", "status", "replay"])
def test_every_command_explains_itself(command: str) -> None:
    out = skybus(*([command] if command else []), "--help")
    assert out.returncode == 0
    assert "usage: skybus" in out.stdout and len(out.stdout) > 300


def test_serve_without_bus_says_what_to_do() -> None:
    env_free = skybus("serve", "ingest")
    assert env_free.returncode != 0 and "--nats" in env_free.stderr


def test_wrong_config_fails_at_start_naming_the_field(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    out = skybus(
        "serve",
        "mosaic",
        "--nats",
        nats_server.url,
        "--store",
        str(tmp_path),
        "--set",
        "outlier_sigmaa=3",
    )
    assert out.returncode == 2 and "outlier_sigmaa" in out.stderr


async def test_status_and_replay(nats_server: EmbeddedNats, store: ObjectStore) -> None:
    nc, js = await setup_bus(nats_server.url)
    await js.publish("skybus.telemetry.test.chunk", b"not a message")  # one dead letter
    for scan in (1, 2):
        await publish_chunk(js, store, scan, b"data")
    stop = asyncio.Event()
    runner = ServiceRunner(
        EchoService(), nats_url=nats_server.url, store=store, settings=settings()
    )
    task = asyncio.create_task(runner.run(stop))

    async def done() -> bool:
        return len(await stream_messages(js, subjects.stream_name("decoded"))) == 2

    await wait_for(done)
    stop.set()
    await task
    status = await asyncio.to_thread(skybus, "status", "--nats", nats_server.url)
    assert status.returncode == 0, status.stderr
    assert "SKYBUS_TELEMETRY" in status.stdout and "skybus-decode" in status.stdout
    assert "malformed message" in status.stdout  # the dead letter with its reason
    replay = await asyncio.to_thread(skybus, "replay", "decode", "--nats", nats_server.url)
    assert replay.returncode == 0, replay.stderr
    info = await js.consumer_info(subjects.stream_name("telemetry"), "skybus-decode")
    assert info.num_pending == 3  # the whole stream is delivered again
    await nc.drain()
