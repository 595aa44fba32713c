"""A simulated TAUVEX scan through all five services: every level a product in the store."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits

from tests.integration.conftest import run_pipeline, unverified


@pytest.fixture(scope="module")
def tauvex_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from simulator import tauvex

    root = tmp_path_factory.mktemp("tauvex_run")
    inputs = root / "inputs"
    inputs.mkdir()
    sim = tauvex.simulate_scan(tauvex.ScanConfig())
    (inputs / "scan_level0.bin").write_bytes(sim.level0)
    (inputs / "scan_attitude.fits").write_bytes(sim.attitude)
    tauvex.reference_catalogue(sim).writeto(inputs / "refcat.fits")
    watch = run_pipeline(inputs, root / "data", root / "out", workers=2)
    return watch, root / "data" / "store", sim


def test_every_tauvex_level_is_a_stored_product(tauvex_run) -> None:  # type: ignore[no-untyped-def]
    watch, store_root, _ = tauvex_run
    kinds = [(p.level, p.product_type) for p in watch.products]
    assert kinds.count(("telemetry", "level1")) == 1
    for kind in (
        ("decoded", "level1a"),
        ("calibrated", "level1g"),
        ("mosaicked", "level2"),
        ("sources", "sources"),
    ):
        assert kinds.count(kind) == 3, (kind, kinds)
    assert kinds.count(("sources", "bandmerged")) == 1
    assert not watch.dead, [d.reason for d in watch.dead]

    assert unverified(watch.products, store_root) == []


def test_tauvex_headers_carry_module_versions(tauvex_run) -> None:  # type: ignore[no-untyped-def]
    watch, store_root, _ = tauvex_run
    level1g = next(p for p in watch.products if p.product_type == "level1g")
    with fits.open(store_root / level1g.key) as hdul:
        h = hdul["EVENTS"].header
        for key in (
            "TELESCOP",
            "TELE_NUM",
            "FILTER",
            "STARTOBS",
            "ENDOBS",
            "NFRAMES",
            "NCOUNTS",
            "CRT_LV1A",
            "VALIDATE",
            "CALC_XY",
            "GET_CAL",
            "APPL_CAL",
            "FLAT_FLD",
            "GEO_CORR",
            "CALC_RA",
            "REGISTER",
        ):
            assert key in h, key
        assert hdul["EVENTS"].columns.names[:13] == [
            "W",
            "S",
            "Z",
            "VALIDITY",
            "X",
            "Y",
            "CALIB",
            "GEOCORRX",
            "GEOCORRY",
            "RA",
            "DEC",
            "GLON",
            "GLAT",
        ]


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="Debian fitsverify not installed")
def test_tauvex_products_pass_fitsverify(tauvex_run) -> None:  # type: ignore[no-untyped-def]
    watch, store_root, _ = tauvex_run
    seen: dict[str, Path] = {}
    for p in watch.products:
        for o in (p.primary, *p.companions):
            if o.key.endswith(".fits"):
                seen.setdefault(p.product_type + o.role, store_root / o.key)
    bad = []
    for kind, path in seen.items():
        out = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
        if out.returncode != 0 or "OK" not in out.stdout:
            bad.append((kind, out.stdout.strip()))
    assert len(seen) >= 5 and not bad, bad


def test_tauvex_source_positions_match_truth(tauvex_run) -> None:  # type: ignore[no-untyped-def]
    """Positions of detected sources (from 1g events, registered on the reference catalogue)
    match truth to better than 1/3 of the PSF FWHM (RMS over sources with S/N > 10)."""
    import numpy as np
    from astropy.table import Table

    from shared.instruments import tauvex as tv

    watch, store_root, sim = tauvex_run
    truth = sim.sources
    seps = []
    for ref in (p for p in watch.products if p.product_type == "sources"):
        table = Table.read(store_root / ref.key)
        table = table[table["SNR"] > 10]
        cosd = np.cos(np.radians(np.asarray(truth["dec_deg"])))
        for row in table:
            d = np.hypot((truth["ra_deg"] - row["RA"]) * cosd, truth["dec_deg"] - row["DEC"]) * 3600
            if d.min() < tv.PSF_FWHM_ARCSEC:
                seps.append(d.min())
    rms = float(np.sqrt(np.mean(np.square(seps))))
    assert len(seps) >= 30
    print(f"TAUVEX position RMS {rms:.2f} arcsec over {len(seps)} detections")
    assert rms < tv.PSF_FWHM_ARCSEC / 3, rms
