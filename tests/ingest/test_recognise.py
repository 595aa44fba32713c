"""Input recognition by content: ISOCAM TDF + EOH beside MIPS, Spitzer and TAUVEX inputs."""

from __future__ import annotations

import pytest

from services.ingest.recognise import InputKind, classify
from shared.instruments import isocam as ic
from simulator import isocam, tauvex
from simulator.mips import SimulatedAOR


@pytest.fixture(scope="module")
def revolution() -> isocam.IsocamSimulation:
    return isocam.simulate_revolution(isocam.RevolutionConfig())


def test_isocam_tdf_and_eoh(revolution: isocam.IsocamSimulation) -> None:
    assert classify("rev129.tdf", revolution.tdf)[0] is InputKind.ISOCAM_TDF
    # names do not matter, and a damaged first buffer still leaves the TDF recognisable
    damaged = b"\x00" * 8 + revolution.tdf[8:]
    assert classify("x.bin", damaged)[0] is InputKind.ISOCAM_TDF
    kind, header = classify("boundaries.fits", revolution.eoh)
    assert kind is InputKind.ISOCAM_EOH and header is not None
    assert str(header["FILENAME"]).startswith("EOHC")


def test_isocam_eoh_by_table_name(revolution: isocam.IsocamSimulation) -> None:
    import io

    from astropy.io import fits

    hdul = fits.open(io.BytesIO(revolution.eoh))
    del hdul[0].header["FILENAME"]
    buf = io.BytesIO()
    hdul.writeto(buf)
    assert classify("eoh.fits", buf.getvalue())[0] is InputKind.ISOCAM_EOH


def test_other_inputs_still_recognised(small_aor: SimulatedAOR) -> None:
    assert classify("aor.tlm", small_aor.telemetry)[0] is InputKind.MIPS_TELEMETRY
    cal = small_aor.calibration[0]
    import io

    buf = io.BytesIO()
    cal.writeto(buf)
    assert classify("cal.fits", buf.getvalue())[0] is InputKind.CALIBRATION
    sim = tauvex.simulate_scan(tauvex.ScanConfig())
    assert classify("l0.bin", sim.level0)[0] is InputKind.TAUVEX_LEVEL0
    assert classify("scan_attitude.fits", sim.attitude)[0] is InputKind.TAUVEX_ATTITUDE


def test_not_isocam() -> None:
    with pytest.raises(ValueError, match="ISOCAM"):
        classify("x.bin", b"\xff" * ic.BUFFER_BYTES)
