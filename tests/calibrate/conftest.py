"""Fixtures of the calibrate tests: simulated AORs (small, seeded) and their calibration."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sim_small():
    """`simulator.mips.simulate_aor(MipsAORConfig.small())`: 6 x 24 um + 70 um with stims."""
    sim_mips = pytest.importorskip("simulator.mips")
    return sim_mips.simulate_aor(sim_mips.MipsAORConfig.small())


@pytest.fixture(scope="session")
def sim_bright():
    """A small 24 um-only AOR with 10 s DCEs and bright sources, so that cores saturate."""
    sim_mips = pytest.importorskip("simulator.mips")
    cfg = sim_mips.MipsAORConfig.small(
        channels=(1,),
        exptime_24_s=10.0,
        n_dither_24=4,
        n_sources=30,
        flux_24_min_ujy=3000.0,
        flux_24_max_ujy=300000.0,
    )
    return sim_mips.simulate_aor(cfg)
