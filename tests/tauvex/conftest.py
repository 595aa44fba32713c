"""Fixtures for the TAUVEX tests: one small seeded scan, processed once per session."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from astropy.io import fits

from services.calibrate import tauvex as cal
from services.decode import tauvex as dec
from services.extract import tauvex as ext
from services.ingest import tauvex as ing
from services.mosaic import tauvex as mos
from simulator import tauvex as sim_mod

#: Reference catalogue for REGISTER: truth sources brighter than this (count/s) in the filter.
REFERENCE_MIN_CPS = 20.0


@dataclass
class Processed:
    sim: sim_mod.TauvexSimulation
    level1: ing.Level1Result
    level1a: dict[int, fits.HDUList]
    chain: dict[int, dict[str, fits.HDUList]]
    level2: dict[int, mos.Level2Image]
    lists: dict[int, object]


@pytest.fixture(scope="session")
def scan() -> sim_mod.TauvexSimulation:
    return sim_mod.simulate_scan(sim_mod.ScanConfig(seed=7))


@pytest.fixture(scope="session")
def processed(scan: sim_mod.TauvexSimulation) -> Processed:
    l1 = ing.level0_to_level1(scan.level0, scan.attitude)
    obs = l1.observations[0]
    l1a = dec.make_level1a(obs)
    chains, l2, lists = {}, {}, {}
    src = scan.sources
    for k in (1, 2, 3):
        bright = np.asarray(src[f"rate_cps_t{k}"]) > REFERENCE_MIN_CPS
        chains[k] = cal.run_chain(
            l1a[k], obs.attitude, keep_levels=cal.chain.LEVELS,
            reference_ra_deg=np.asarray(src["ra_deg"])[bright],
            reference_dec_deg=np.asarray(src["dec_deg"])[bright])
        l2[k] = mos.make_level2(chains[k]["1g"], obs.attitude)
        lists[k] = ext.detect_sources(l2[k].hdul)
    return Processed(scan, l1, l1a, chains, l2, lists)
