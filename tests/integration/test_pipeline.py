"""Products move through all five services on a real nats-server and land in the store."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits

from tests.integration.conftest import PipelineRun, run_pipeline, unverified


def test_every_level_is_produced_and_stored_with_its_sha256(mips_run: PipelineRun) -> None:
    sim = mips_run.sim
    n24 = sum(1 for r in sim.truth_pointing if r["channel"] == 1)  # type: ignore[attr-defined]
    n70 = sum(1 for r in sim.truth_pointing if r["channel"] == 2 and not r["is_stim"])  # type: ignore[attr-defined]
    counts = {(p.level, p.product_type) for p in mips_run.watch.products}
    assert {
        ("telemetry", "dce"),
        ("decoded", "raw"),
        ("calibrated", "bcd"),
        ("mosaicked", "maic"),
        ("sources", "sources"),
        ("sources", "bandmerged"),
    } <= counts
    assert len(mips_run.products("calibrated", "bcd")) == n24 + n70
    assert len(mips_run.products("mosaicked", "maic")) == 2
    assert len(mips_run.products("sources", "bandmerged")) == 1
    assert not mips_run.watch.dead, [d.reason for d in mips_run.watch.dead]
    assert unverified(mips_run.watch.products, mips_run.store_root) == []


def test_bcd_companions_and_spitzer_names(mips_run: PipelineRun) -> None:
    for ref in mips_run.products("calibrated", "bcd"):
        roles = {c.role for c in ref.companions}
        assert {"bunc", "mask"} <= roles
        name = ref.key.rsplit("/", 1)[-1]
        o = ref.obs
        stem = f"SPITZER_M{o.channel}_{o.aorkey}_{o.expid:04d}_{o.dcenum:04d}"
        assert name == f"{stem}_{ref.version}_bcd.fits"
        if o.channel == 2:
            assert "fbcd" in roles


def test_final_products_copied_out(mips_run: PipelineRun) -> None:
    names = {p.name for p in mips_run.out_dir.iterdir()}
    assert any(n.endswith("_maic.fits") for n in names)
    assert any(n.endswith("_maic.png") for n in names)
    assert any(n.endswith("bandmerged.tbl") for n in names)


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="Debian fitsverify not installed")
def test_every_fits_product_passes_fitsverify(mips_run: PipelineRun) -> None:
    kinds: dict[tuple[str, str], Path] = {}
    for ref in mips_run.watch.products:
        for obj in (ref.primary, *ref.companions):
            if obj.key.endswith(".fits"):
                kinds.setdefault((ref.product_type, obj.role), mips_run.store_root / obj.key)
    failures = []
    for kind, path in sorted(kinds.items()):
        out = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
        if out.returncode != 0 or "OK" not in out.stdout:
            failures.append(f"{kind}: {out.stdout.strip()} {out.stderr.strip()}")
    assert len(kinds) >= 8
    assert not failures, failures


def test_bcd_headers_carry_spitzer_keywords(mips_run: PipelineRun) -> None:
    ref = mips_run.products("calibrated", "bcd")[0]
    header = fits.getheader(mips_run.store_root / ref.key)
    for key in (
        "TELESCOP",
        "INSTRUME",
        "CHNLNUM",
        "AORKEY",
        "EXPID",
        "DCENUM",
        "EXPTIME",
        "DATE_OBS",
        "MJD_OBS",
        "BUNIT",
        "FLUXCONV",
        "PXSCAL1",
        "PXSCAL2",
        "CREATOR",
    ):
        assert key in header, key
    assert header["BUNIT"] == "MJy/sr" and header["CTYPE1"] == "RA---TAN-SIP"


def test_corrupt_telemetry_is_dead_lettered_and_the_rest_processed(tmp_path: Path) -> None:
    from simulator import mips

    cfg = mips.MipsAORConfig.small(channels=(1,))
    sim = mips.simulate_aor(cfg)
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = bytearray(sim.telemetry)
    data[len(data) // 2] ^= 0xFF  # one corrupt packet in the middle of the AOR
    (inputs / "aor.tlm").write_bytes(bytes(data))
    (inputs / "not_telemetry.txt").write_bytes(b"hello, this is not telemetry\n")
    for hdul in sim.calibration:
        hdul.writeto(inputs / str(hdul[0].header["FILENAME"]))
    watch = run_pipeline(inputs, tmp_path / "data", tmp_path / "out", workers=1)
    reasons = " | ".join(d.reason for d in watch.dead)
    assert any("not_telemetry.txt" in d.reason for d in watch.dead), reasons
    assert any("aor.tlm" in d.reason for d in watch.dead), reasons
    n_dce = len(sim.raw_dces)  # type: ignore[attr-defined]
    bcds = [p for p in watch.products if p.product_type == "bcd"]
    assert n_dce - 2 <= len(bcds) < n_dce  # the corrupt DCE lost, the good ones all calibrated
    assert any(p.product_type == "maic" for p in watch.products)


def test_scan_map_with_three_bands(tmp_path: Path) -> None:
    """A MIPSSCAN AOR with 24, 70 and 160 um: three post-BCD mosaics and one band-merged list
    with a column set per band."""
    from astropy.table import Table

    from simulator import mips

    inputs = tmp_path / "in"
    mips.write_aor(
        mips.MipsAORConfig.scan_map(channels=(1, 2, 3)), inputs, truth_dir=tmp_path / "truth"
    )
    watch = run_pipeline(inputs, tmp_path / "data", tmp_path / "out", workers=2)
    assert not watch.dead, [d.reason for d in watch.dead]
    assert sorted(p.obs.channel for p in watch.products if p.product_type == "maic") == [1, 2, 3]
    merged = next(tmp_path.glob("out/*bandmerged.tbl"))
    table = Table.read(merged, format="ascii.ipac")
    for band in ("24um", "70um", "160um"):
        assert f"flag_{band}" in table.colnames
        assert set(table[f"flag_{band}"]) <= {"D", "U", "N"}
    assert (table["flag_160um"] == "D").sum() >= 1


def test_dces_wait_for_their_calibration_files(tmp_path: Path) -> None:
    """Telemetry submitted before its calibration files: calibrate retries the DCEs (it does not
    calibrate them without DARK and FLAT) and, once the files are submitted, every BCD is made
    with both applied; nothing is dead-lettered."""
    import asyncio
    import time

    from shared import bus, subjects
    from shared.cli import pipeline, submit_and_wait
    from simulator import mips

    sim = mips.simulate_aor(mips.MipsAORConfig.small(channels=(1,)))
    tele, cal = tmp_path / "telemetry", tmp_path / "calibration"
    tele.mkdir()
    cal.mkdir()
    (tele / "aor.tlm").write_bytes(sim.telemetry)
    for hdul in sim.calibration:
        hdul.writeto(cal / str(hdul[0].header["FILENAME"]))

    async def go() -> tuple[object, int, float]:
        async with pipeline(tmp_path / "data", calibrate_workers=1) as (url, store):
            first = asyncio.create_task(
                submit_and_wait(url, store, [str(tele)], out_dir=None, quiet=True, timeout_s=300)
            )
            nc = await bus.connect(url, name="test", reconnect_forever=False)
            js = nc.jetstream()
            stream = subjects.stream_name(subjects.SERVICE_INPUT["calibrate"])
            redelivered = 0
            for _ in range(120):  # until calibrate has had to put a DCE back
                await asyncio.sleep(0.25)
                try:
                    info = await js.consumer_info(stream, subjects.durable_name("calibrate"))
                except Exception:
                    continue
                redelivered = int(info.num_redelivered)
                if redelivered:
                    break
            t0 = time.monotonic()
            await submit_and_wait(url, store, [str(cal)], out_dir=None, quiet=True, timeout_s=120)
            cal_s = time.monotonic() - t0
            watch = await first
            await nc.close()
            return watch, redelivered, cal_s

    watch, redelivered, cal_s = asyncio.run(go())
    assert redelivered >= 1  # the waiting path was exercised
    # a submission of calibration files only (no product message) returns once idle
    assert cal_s < 60.0, cal_s
    assert not watch.dead, [d.reason for d in watch.dead]  # type: ignore[attr-defined]
    bcds = [p for p in watch.products if p.product_type == "bcd"]  # type: ignore[attr-defined]
    assert len(bcds) == len(sim.raw_dces)  # type: ignore[attr-defined]
    for ref in bcds:
        h = fits.getheader(tmp_path / "data" / "store" / ref.key)
        assert h["DARKSUB"] == "COMPLETE" and h["FLATFLD"] == "COMPLETE", ref.key
