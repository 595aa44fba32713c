"""One real run of the whole pipeline (embedded nats-server, five services, local store) on
the default simulated MIPS AOR, shared by the integration and science-truth tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.cli import RunWatch, pipeline, submit_and_wait
from shared.store import ObjectStore


@dataclass
class PipelineRun:
    watch: RunWatch
    store_root: Path
    out_dir: Path
    inputs: Path
    sim: object  #: simulator.mips.SimulatedAOR with the truth

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(str(self.store_root))

    def products(self, level: str, product_type: str | None = None) -> list:
        return [
            p
            for p in self.watch.products
            if p.level == level and (product_type is None or p.product_type == product_type)
        ]


def unverified(products: list, store_root: Path) -> list[str]:
    """Keys of the products' files that are missing from the store or differ from their
    recorded size and sha256."""

    async def check() -> list[str]:
        store = ObjectStore(str(store_root))
        return [
            o.key for p in products for o in (p.primary, *p.companions) if not await store.verify(o)
        ]

    return asyncio.run(check())


def run_pipeline(inputs: Path, data: Path, out: Path, *, workers: int = 2) -> RunWatch:
    async def go() -> RunWatch:
        async with pipeline(data, calibrate_workers=workers) as (url, store):
            return await submit_and_wait(
                url, store, [str(inputs)], out_dir=out, quiet=True, timeout_s=600
            )

    return asyncio.run(go())


def run_simulated_aor(cfg: object, root: Path) -> PipelineRun:
    """Simulate the MIPS AOR `cfg` (a simulator.mips.MipsAORConfig), write its telemetry and
    calibration files under `root`/inputs and run the whole pipeline on them."""
    from simulator import mips

    assert isinstance(cfg, mips.MipsAORConfig)
    inputs = root / "inputs"
    inputs.mkdir()
    sim = mips.simulate_aor(cfg)
    (inputs / f"mips_aor_{cfg.aorkey}.tlm").write_bytes(sim.telemetry)
    for hdul in sim.calibration:
        hdul.writeto(inputs / str(hdul[0].header["FILENAME"]))
    watch = run_pipeline(inputs, root / "data", root / "products")
    return PipelineRun(watch, root / "data" / "store", root / "products", inputs, sim)


@pytest.fixture(scope="session")
def mips_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRun]:
    """The default AOR; SKYBUS_TEST_SEED=N runs the same tests on another sky (seed N)."""
    from simulator import mips

    seed = os.environ.get("SKYBUS_TEST_SEED")
    cfg = mips.MipsAORConfig(seed=int(seed)) if seed else mips.MipsAORConfig()
    yield run_simulated_aor(cfg, tmp_path_factory.mktemp("mips_run"))
