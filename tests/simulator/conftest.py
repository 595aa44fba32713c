"""Fixtures of the simulator tests: one small seeded MIPS AOR per session."""

from __future__ import annotations

import pytest

from simulator.mips import MipsAORConfig, SimulatedAOR, simulate_aor


@pytest.fixture(scope="session")
def small_aor() -> SimulatedAOR:
    return simulate_aor(MipsAORConfig.small())
