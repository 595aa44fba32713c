"""ISOCAM format, TDF_First_Scan and Derive_ERD: layout, clock, split, corruption, round trip."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from services.decode import isocam as dec
from services.ingest import isocam as ing
from shared.fitsio import to_bytes
from shared.instruments import isocam as ic
from simulator import isocam as sim_mod


def test_layout_sizes() -> None:
    assert ic.BUFFER_HEADER.itemsize == ic.HEADER_BYTES == 32
    assert ic.F1_BLOCK.itemsize == 32
    assert ic.F2_HEADER.itemsize == 56
    assert ic.F2_BLOCK.itemsize == 56 + 2 * ic.NPIX
    assert ic.MAX_F2_PER_BUFFER >= 3


def test_naming_rules() -> None:
    assert ic.obs_number(449, 303) == "44900303"
    assert ic.product_name("CMOS", "44900303") == "CMOS44900303"
    assert ic.product_name("EOHC", "449") == "EOHC449"
    with pytest.raises(ValueError):
        ic.product_name("CMOS", "4490030")
    with pytest.raises(ValueError):
        ic.product_name("XXXX", "44900303")


def test_split_clock_and_erd_round_trip(revolution, processed) -> None:  # type: ignore[no-untyped-def]
    r = processed.ingest
    assert r.n_bad_checksum == 0 and r.n_bad_sync == 0
    assert [o.obsnum for o in r.observations] == ["12900907", "12900908"]
    cfg = revolution.config
    # clock: CAMITK0 exact, ITK unit to 1e-5 relative, CAMUTK0 within 2 UTK
    camitk0 = cfg.itk_at_start + int(np.floor(cfg.boot_delay_s / cfg.itk_unit_s))
    assert r.clock.camitk0 == camitk0
    assert abs(r.clock.itk_unit_s / cfg.itk_unit_s - 1) < 1e-5
    true_camutk0 = cfg.start_utk + (camitk0 - cfg.itk_at_start) * cfg.itk_unit_s * 24
    assert abs(r.clock.camutk0 - true_camutk0) <= 2
    for obsnum, cier in processed.cier.items():
        h = cier[0].header
        assert h["FILENAME"] == f"CIER{obsnum}"
        for k in ("TREFUTC1", "TREFUTC2", "TREFUTK", "TREFITK", "TREFITKU", "CAMITK0",
                  "CAMUTK0"):
            assert k in h
        sel = revolution.readouts["obsnum"] == obsnum
        np.testing.assert_array_equal(ic.column(cier, "ARRAY"), revolution.readouts["array"][sel])
        np.testing.assert_array_equal(ic.column(cier, "GSCPTKEY"), revolution.readouts["itk"][sel])
        kinds = np.char.strip(cier[1].data["READOUT"].astype(str))
        np.testing.assert_array_equal(kinds == "EOI", revolution.readouts["kind"][sel] == 1)
        np.testing.assert_array_equal(
            ic.column(cier, "GSCPTKEY"), h["CAMITK0"] + ic.column(cier, "F2BOOTTI"))
    # the CTDF slice survives its FITS round trip
    o = r.observations[0]
    back = ing.TdfObservation.from_bytes(o.to_bytes())
    np.testing.assert_array_equal(back.buffers, o.buffers)
    assert back.name == "CTDF12900907"


def test_corrupted_buffers_counted_and_rest_decoded(revolution) -> None:  # type: ignore[no-untyped-def]
    clean = ing.split_tdf(revolution.tdf, revolution.eoh)
    n_read = {o.obsnum: len(dec.derive_erd(o)[1].data) for o in clean.observations}
    bad = (15, 40, 41, 130)
    sim = sim_mod.simulate_revolution(sim_mod.RevolutionConfig(seed=3, corrupt_buffers=bad))
    tdf = bytearray(sim.tdf)
    tdf[60 * 8192: 60 * 8192 + 4] = b"XXXX"  # broken sync
    r = ing.split_tdf(bytes(tdf) + b"\x00" * 100, sim.eoh)
    reasons = {p.reason.split(" (")[0]: p for p in r.problems}
    assert r.n_bad_checksum == len(bad)
    assert reasons["bad checksum"].count == len(bad)
    assert reasons["bad checksum"].first_buffers == bad
    assert reasons["bad sync/ident"].count == 1
    assert "truncated final buffer" in reasons
    assert reasons["buffer counter gaps"].count == len(bad) + 1
    assert len(r.observations) == 2
    lost = 0
    for o in r.observations:
        cier = dec.derive_erd(o)
        n = len(cier[1].data)
        assert 0 < n <= n_read[o.obsnum]
        lost += n_read[o.obsnum] - n
        # what was decoded is exactly what was simulated
        sel = sim.readouts["obsnum"] == o.obsnum
        keep = np.isin(sim.readouts["itk"][sel], ic.column(cier, "GSCPTKEY"))
        np.testing.assert_array_equal(ic.column(cier, "ARRAY"), sim.readouts["array"][sel][keep])
    assert 0 < lost <= 3 * 5  # at most 3 readouts per lost buffer


def test_not_a_tdf_raises() -> None:
    with pytest.raises(ValueError, match="not a TDF"):
        ing.split_tdf(b"\x00" * 8192 * 3, b"")
    with pytest.raises(ValueError, match="no complete"):
        ing.split_tdf(b"SIMPLE  =", b"")


def test_products_pass_fitsverify(processed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify not installed")
    obsnum = "12900907"
    prods = {"CIER": processed.cier[obsnum], "CISP": processed.spd[obsnum].cisp,
             "CGLL": processed.spd[obsnum].cgll, "CCIM": processed.spd[obsnum].ccim,
             "CMAP": processed.maps[obsnum].cmap, "CMOS": processed.maps[obsnum].cmos,
             "CPSL": processed.cpsl[obsnum]}
    for root, hdul in prods.items():
        assert hdul[0].header["FILENAME"] == f"{root}{obsnum}"
        assert hdul[0].header["NAXIS"] == 0 and len(hdul) == 2
        assert hdul[1].name == root
        path = tmp_path / f"{root}{obsnum}.fits"
        path.write_bytes(to_bytes(hdul))
        out = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "verification OK" in out.stdout, out.stdout + out.stderr
    ctdf = tmp_path / "CTDF.fits"
    ctdf.write_bytes(processed.ingest.observations[0].to_bytes())
    out = subprocess.run(["fitsverify", "-q", str(ctdf)], capture_output=True, text=True)
    assert out.returncode == 0 and "verification OK" in out.stdout, out.stdout
    assert processed.maps[obsnum].png.startswith(b"\x89PNG")
