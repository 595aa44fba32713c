"""Gzip inputs are decompressed and recognised by what they hold (not taken for CCSDS
telemetry); the CCSDS test needs chained packet headers, not one version bit."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from services.ingest.recognise import InputKind, classify, gunzip, recognise
from shared import ccsds
from simulator.mips import SimulatedAOR
from tests.ingest import archive


def test_gzip_bcd_is_recognised_and_named_without_gz(tmp_path: Path) -> None:
    name = archive.spitzer_name(1, 1, "bcd", ".fits.gz")
    fits_bytes = archive.product(1, dcenum=1)
    path = tmp_path / name
    path.write_bytes(gzip.compress(fits_bytes))
    found = recognise(name, path.read_bytes())
    assert found.kind is InputKind.SPITZER_FITS and found.gzipped
    assert found.name == archive.spitzer_name(1, 1, "bcd")  # stored without ".gz"
    assert found.data == fits_bytes
    assert found.header is not None and found.header["DCENUM"] == 1
    # classify on the compressed bytes says what they hold
    assert classify(name, path.read_bytes())[0] is InputKind.SPITZER_FITS
    # upper-case suffix, and several gzip members (cat a.gz b.gz)
    half = len(fits_bytes) // 2
    two = gzip.compress(fits_bytes[:half]) + gzip.compress(fits_bytes[half:])
    again = recognise(name.upper(), two)
    assert again.data == fits_bytes and again.name == name.upper()[:-3]


def test_gzip_telemetry_is_telemetry(small_aor: SimulatedAOR) -> None:
    found = recognise("aor.tlm.gz", gzip.compress(small_aor.telemetry))
    assert found.kind is InputKind.MIPS_TELEMETRY and found.name == "aor.tlm"


def test_gzip_errors_say_what_to_do() -> None:
    big = gzip.compress(b"\0" * 100_000)
    with pytest.raises(ValueError, match=r"expands to more than 1000 bytes .*max_gunzip_mb"):
        gunzip(big, max_bytes=1000)
    with pytest.raises(ValueError, match=r"expands to more than 1000 bytes"):
        recognise("x.fits.gz", big, max_gunzip_bytes=1000)
    assert len(gunzip(big, max_bytes=100_000)) == 100_000
    packed = gzip.compress(archive.product(1))
    with pytest.raises(ValueError, match=r"truncated gzip file.*re-download"):
        recognise("x_bcd.fits.gz", packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="corrupt gzip data"):
        recognise("x_bcd.fits.gz", packed[:10] + b"\xff" * 50)
    with pytest.raises(ValueError, match="another gzip file"):
        recognise("x.gz.gz", gzip.compress(packed))
    # a gzip of something unknown is not MIPS telemetry
    with pytest.raises(ValueError, match="unrecognised input"):
        recognise("notes.txt.gz", gzip.compress(b"\x00\x17hello" * 100))


def test_ccsds_needs_chained_headers(small_aor: SimulatedAOR) -> None:
    tlm = small_aor.telemetry
    assert classify("aor.tlm", tlm)[0] is InputKind.MIPS_TELEMETRY
    # first packet damaged: a CRC-valid MIPS packet further on still says telemetry
    assert classify("aor.tlm", b"\x00" * 8 + tlm[8:])[0] is InputKind.MIPS_TELEMETRY
    # one or two whole packets of another mission: CCSDS, left to the splitter to refuse
    other = ccsds.build_packet(apid=0x42, seq_flags=3, seq_count=0, body=b"\x01" * 30)
    assert classify("x.bin", other * 2)[0] is InputKind.MIPS_TELEMETRY
    # version bits 000 alone are not enough: lengths that run past the file, junk after
    # the first packet, a telecommand type bit
    for junk in (
        b"\x00\x10\x00\x00\xff\xff" + b"x" * 100,
        other + b"hello, not a packet " * 5,
        b"\x1f\x00" + b"\x00" * 60,
    ):
        with pytest.raises(ValueError, match="unrecognised input"):
            classify("x.bin", junk)


def test_an_archive_container_is_named_with_what_to_do() -> None:
    """A download left packed (zip, tar, tar.gz) is refused with what it is and to unpack it,
    not as an unrecognised input."""
    import io
    import tarfile
    import zipfile

    bcd = archive.product(1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x_bcd.fits", bcd)
    with pytest.raises(ValueError, match="a zip archive: unpack it"):
        recognise("download.zip", buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("x_bcd.fits")
        info.size = len(bcd)
        t.addfile(info, io.BytesIO(bcd))
    with pytest.raises(ValueError, match="a tar archive: unpack it"):
        recognise("download.tar", buf.getvalue())
    with pytest.raises(ValueError, match="a tar archive: unpack it"):
        recognise("download.tar.gz", gzip.compress(buf.getvalue()))
