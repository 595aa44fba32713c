"""Shared fixtures: a real nats-server with JetStream on a free loopback port, a real store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.embedded import EmbeddedNats
from shared.logs import configure
from shared.store import ObjectStore

configure(level="warning", json=True)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path / "jetstream") as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(str(tmp_path / "store"))
