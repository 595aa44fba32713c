"""Fixtures for the ISOCAM tests: one seeded revolution (2 raster observations), processed once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from astropy.io import fits

from services.calibrate import isocam as cal
from services.decode import isocam as dec
from services.extract import isocam as ext
from services.ingest import isocam as ing
from services.mosaic import isocam as mos
from simulator import isocam as sim_mod


@dataclass
class Processed:
    sim: sim_mod.IsocamSimulation
    ingest: ing.IngestResult
    cier: dict[str, fits.HDUList]
    spd: dict[str, cal.SpdProducts]
    maps: dict[str, mos.AarMaps]
    cpsl: dict[str, fits.HDUList]


@pytest.fixture(scope="session")
def revolution() -> sim_mod.IsocamSimulation:
    return sim_mod.simulate_revolution(sim_mod.RevolutionConfig(seed=3))


@pytest.fixture(scope="session")
def processed(revolution: sim_mod.IsocamSimulation) -> Processed:
    r = ing.split_tdf(revolution.tdf, revolution.eoh)
    cier, spd, maps, cpsl = {}, {}, {}, {}
    for o in r.observations:
        cier[o.obsnum] = dec.derive_erd(o.to_bytes())
        spd[o.obsnum] = cal.calibrate_observation(cier[o.obsnum])
        maps[o.obsnum] = mos.make_maps(spd[o.obsnum].ccim)
        cpsl[o.obsnum] = ext.extract_sources(maps[o.obsnum].cmos, maps[o.obsnum].cmap)
    return Processed(revolution, r, cier, spd, maps, cpsl)
