"""A simulated ISOCAM revolution (TDF + EOH) through all five services: CTDF -> CIER ->
CISP/CGLL/CCIM -> CMOS/CMAP -> CPSL per observation, in the store, checked against truth."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from shared.cli import RunWatch
from shared.instruments import isocam as ic
from tests.integration.conftest import run_pipeline, unverified

#: Product type -> the ISO product roots of its files (primary first).
ROOTS = {
    "tdf": ("CTDF",),
    "cier": ("CIER",),
    "spd": ("CISP", "CGLL", "CCIM"),
    "cmos": ("CMOS", "CMAP", "CMOS"),
    "cpsl": ("CPSL", "CPSL"),
}
LEVELS = {
    "tdf": "telemetry",
    "cier": "decoded",
    "spd": "calibrated",
    "cmos": "mosaicked",
    "cpsl": "sources",
}
#: Buffers whose payload gets a few flipped bytes in the corrupted run (first observation).
CORRUPT_BUFFERS = (25, 40, 41)


def _simulate(root: Path, *, corrupt: tuple[int, ...] = ()):  # type: ignore[no-untyped-def]
    from simulator import isocam

    sim = isocam.simulate_revolution(isocam.RevolutionConfig())
    tdf = bytearray(sim.tdf)
    for b in corrupt:
        start = b * ic.BUFFER_BYTES + ic.HEADER_BYTES + 4000  # inside an F2 array
        tdf[start : start + 3] = bytes(x ^ 0xFF for x in tdf[start : start + 3])
    inputs = root / "inputs"
    inputs.mkdir()
    rev = sim.config.revolution
    (inputs / f"isocam_rev{rev:03d}.tdf").write_bytes(bytes(tdf))
    (inputs / f"EOHC{rev:03d}.fits").write_bytes(sim.eoh)
    watch = run_pipeline(inputs, root / "data", root / "out", workers=2)
    return watch, root / "data" / "store", sim


@pytest.fixture(scope="module")
def isocam_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _simulate(tmp_path_factory.mktemp("isocam_run"))


@pytest.fixture(scope="module")
def isocam_corrupt_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _simulate(tmp_path_factory.mktemp("isocam_corrupt"), corrupt=CORRUPT_BUFFERS)


def _by_obs(watch: RunWatch, product_type: str) -> dict[str, object]:
    return {
        str(p.obs.obsnum): p
        for p in watch.products
        if p.instrument == "ISOCAM" and p.product_type == product_type
    }


def _assert_every_level(watch: RunWatch, obsnums: list[str]) -> None:
    for product_type, level in LEVELS.items():
        refs = [p for p in watch.products if p.product_type == product_type]
        assert sorted(str(p.obs.obsnum) for p in refs) == obsnums, (product_type, refs)
        assert all(p.level == level and p.instrument == "ISOCAM" for p in refs)


def test_every_isocam_level_is_a_stored_product(isocam_run) -> None:  # type: ignore[no-untyped-def]
    watch, store_root, sim = isocam_run
    assert not watch.dead, [d.reason for d in watch.dead]
    _assert_every_level(watch, sorted(sim.sources))
    spd = next(iter(_by_obs(watch, "spd").values()))
    assert {o.role for o in spd.companions} == {"cgll", "ccim"}  # type: ignore[attr-defined]
    cmos = next(iter(_by_obs(watch, "cmos").values()))
    assert {o.role for o in cmos.companions} == {"cmap", "quicklook"}  # type: ignore[attr-defined]

    assert unverified(watch.products, store_root) == []


def test_isocam_names_follow_the_iso_rule(isocam_run) -> None:  # type: ignore[no-untyped-def]
    """Every file is root + 8-digit observation number (+ .fits/.png/.tbl), the root matching
    its role, and the name is the file's FILENAME keyword."""
    watch, store_root, _ = isocam_run
    for product_type, roots in ROOTS.items():
        for obsnum, ref in _by_obs(watch, product_type).items():
            objs = (ref.primary, *ref.companions)  # type: ignore[attr-defined]
            names = [ref.key.rsplit("/", 1)[-1]] + [o.name for o in ref.companions]  # type: ignore[attr-defined]
            assert len(names) == len(roots)
            for obj, name, root in zip(objs, names, roots, strict=True):
                m = re.fullmatch(r"([A-Z]{4})(\d{8})\.(fits|png|tbl)", name)
                assert m and m[1] == root and m[2] == obsnum, name
                if m[3] == "fits":
                    with fits.open(store_root / obj.key) as hdul:
                        assert hdul[0].header["FILENAME"] == f"{root}{obsnum}"
                        assert hdul[0].header["OBSNUM"] == obsnum


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="Debian fitsverify not installed")
def test_isocam_products_pass_fitsverify(isocam_run) -> None:  # type: ignore[no-untyped-def]
    watch, store_root, _ = isocam_run
    seen: dict[str, Path] = {}
    for p in watch.products:
        for o in (p.primary, *p.companions):
            if o.key.endswith(".fits"):
                seen.setdefault(o.key.rsplit("/", 1)[-1][:4], store_root / o.key)
    assert sorted(seen) == sorted({"CTDF", "CIER", "CISP", "CGLL", "CCIM", "CMOS", "CMAP", "CPSL"})
    bad = []
    for root, path in seen.items():
        out = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
        if out.returncode != 0 or "verification OK" not in out.stdout:
            bad.append((root, out.stdout.strip()))
    assert not bad, bad


def test_isocam_cpsl_matches_truth(isocam_run) -> None:  # type: ignore[no-untyped-def]
    """As the ISOCAM science tests: CPSL sources of S/N > 10 lie within half a pixel field of
    a true source, positions RMS < 1/3 of the pixel field, median flux ratio within 5% for
    S/N > 30; the IPAC table holds the same sources as the FITS list."""
    watch, store_root, sim = isocam_run
    seps, ratios, n_bright = [], [], 0
    for obsnum, ref in _by_obs(watch, "cpsl").items():
        cpsl = Table.read(store_root / ref.key, hdu=1)  # type: ignore[attr-defined]
        cpsl.meta.update(fits.getheader(store_root / ref.key, 0))  # type: ignore[attr-defined]
        tbl = Table.read(store_root / ref.file("tbl").key, format="ascii.ipac")  # type: ignore[attr-defined]
        assert len(tbl) == len(cpsl) > 0
        lens = float(cpsl.meta["LENS"])  # pixel field of view, arcsec
        truth = sim.sources[obsnum]
        cosd = np.cos(np.radians(np.asarray(truth["dec_deg"])))
        for row in cpsl[cpsl["SNR"] > 10]:
            n_bright += 1
            d = np.hypot((truth["ra_deg"] - row["RA"]) * cosd, truth["dec_deg"] - row["DEC"]) * 3600
            i = int(np.argmin(d))
            if d[i] < lens / 2:
                seps.append(d[i])
                if row["SNR"] > 30:
                    ratios.append(row["FLUX"] / truth["flux_jy"][i])
    assert n_bright >= 15
    assert len(seps) >= 0.95 * n_bright, (len(seps), n_bright)
    rms = float(np.sqrt(np.mean(np.square(seps))))
    print(
        f"ISOCAM: {len(seps)}/{n_bright} S/N>10 matched, position RMS {rms:.2f} arcsec, "
        f"median flux ratio (S/N>30) {np.median(ratios):.3f} over {len(ratios)}"
    )
    assert rms < 6.0 / 3.0, rms
    assert len(ratios) >= 8 and abs(np.median(ratios) - 1.0) < 0.05


def test_corrupted_tdf_dead_letters_and_products(isocam_corrupt_run) -> None:  # type: ignore[no-untyped-def]
    """Flipped bytes in a few buffers: the bad buffers are dead-lettered with readable reasons
    (bad checksum, counter gaps), and every observation's products are still made."""
    watch, _, sim = isocam_corrupt_run
    reasons = [d.reason for d in watch.dead]
    assert watch.dead and all(d.service == "ingest" for d in watch.dead), reasons
    checksum = [r for r in reasons if "bad checksum" in r]
    assert len(checksum) == 1, reasons
    assert checksum[0].startswith("isocam_rev129.tdf: ")
    assert f": {len(CORRUPT_BUFFERS)} " in checksum[0]
    assert ", ".join(map(str, CORRUPT_BUFFERS)) in checksum[0]
    assert any("buffer counter gaps" in r for r in reasons), reasons
    assert not any("outside any EOH observation" in r for r in reasons), reasons
    _assert_every_level(watch, sorted(sim.sources))
