"""Decoding MIPS DCE packets to Spitzer raw products: bit for bit, headers, corrupt input."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from astropy.io import fits

from services.decode.mips import MipsTelemetryError, decode_dce, raw_product_name
from services.decode.mips import telemetry as tlm
from services.ingest.mips import split_aor_telemetry
from shared import ccsds
from simulator.mips import SimulatedAOR

REQUIRED = (
    "TELESCOP", "INSTRUME", "CHNLNUM", "AORKEY", "EXPID", "DCENUM", "AOT_TYPE", "EXPTIME",
    "NSAMPLES", "DATE_OBS", "MJD_OBS", "SCLK_OBS", "RA_REF", "DEC_REF", "PA_REF", "SATLEVEL",
    "NDCEGRP", "BUNIT",
)  # fmt: skip


@pytest.fixture(scope="module")
def chunks(small_aor: SimulatedAOR) -> list[bytes]:
    split = split_aor_telemetry(small_aor.telemetry)
    assert not split.problems
    return [c.data for c in split.chunks]


def test_decoded_equals_simulated_raw_bit_for_bit(
    small_aor: SimulatedAOR, chunks: list[bytes]
) -> None:
    assert len(chunks) == len(small_aor.raw_dces)
    for chunk, ref in zip(chunks, small_aor.raw_dces, strict=True):
        out = decode_dce(chunk)
        assert len(out) == 1
        got, want = out[0], ref[0]
        assert got.data.dtype.kind == "i" and got.data.dtype.itemsize == 4
        assert got.data.shape == want.data.shape
        assert np.array_equal(got.data, want.data)
        for key in (*REQUIRED, "STIMFLSH", "SLPSCALE"):
            assert got.header.get(key) == want.header.get(key), key
        for key in REQUIRED:
            assert key in got.header, key
        # and through a FITS file
        buf = io.BytesIO()
        out.writeto(buf)
        back = fits.open(io.BytesIO(buf.getvalue()))
        assert np.array_equal(back[0].data, want.data)


def test_header_values(small_aor: SimulatedAOR, chunks: list[bytes]) -> None:
    tp = small_aor.truth_pointing
    for chunk, row in zip(chunks, tp, strict=True):
        h = decode_dce(chunk)[0].header
        assert h["TELESCOP"] == "Spitzer" and h["INSTRUME"] == "MIPS" and h["BUNIT"] == "DN"
        assert (h["CHNLNUM"], h["EXPID"], h["DCENUM"]) == (
            row["channel"],
            row["expid"],
            row["dcenum"],
        )
        assert h["RA_REF"] == row["ra"] and h["DEC_REF"] == row["dec"] and h["PA_REF"] == row["pa"]
        assert h["MJD_OBS"] == pytest.approx(row["mjd"], abs=1e-9)
        assert h["AOT_TYPE"] == "MIPSPHOT"
        if h["CHNLNUM"] == 1:
            assert h["SLPSCALE"] > 0 and "STIMFLSH" not in h
            assert h["EXPTIME"] == pytest.approx(h["NSAMPLES"] * 0.524288)
        else:
            assert h["STIMFLSH"] == bool(row["is_stim"])
            assert h["NSAMPLES"] == round(h["EXPTIME"] * 8)
    first = decode_dce(chunks[0])[0].header
    assert first["DATE_OBS"] == "2005-05-10T06:00:00.000"  # start_mjd 53500.25
    assert raw_product_name(first) == (f"SPITZER_M1_{small_aor.config.aorkey}_0000_0000_1_raw.fits")


def _packets(chunk: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(chunk):
        n = ccsds.PrimaryHeader.unpack(chunk, pos).packet_bytes
        out.append((pos, n))
        pos += n
    return out


def test_corrupt_chunks_raise(chunks: list[bytes]) -> None:
    chunk = chunks[1]
    pk = _packets(chunk)
    bad = bytearray(chunk)
    bad[pk[1][0] + 100] ^= 1
    with pytest.raises(MipsTelemetryError, match="CRC"):
        decode_dce(bytes(bad))
    (o, n) = pk[2]
    with pytest.raises(MipsTelemetryError, match="out of order"):
        decode_dce(chunk[:o] + chunk[o + n :])
    with pytest.raises(MipsTelemetryError, match="segments present"):
        decode_dce(chunk[: pk[-1][0]])
    with pytest.raises(MipsTelemetryError, match="runs past the end"):
        decode_dce(chunk[:-10])
    with pytest.raises(MipsTelemetryError, match="must open with a DCE header"):
        decode_dce(chunk[pk[1][0] :])
    ch = [tlm.unpack_dce_header(c[: _packets(c)[0][1]])[0].channel for c in chunks]
    other = next(c for c, chn in zip(chunks[2:], ch[2:], strict=True) if chn == ch[1])
    with pytest.raises(MipsTelemetryError, match="another DCE"):
        decode_dce(chunk[: pk[1][0]] + other[_packets(other)[1][0] :])
    with pytest.raises(ValueError, match="empty"):
        decode_dce(b"")


def test_header_layout_checks(chunks: list[bytes]) -> None:
    """A header packet with a valid CRC but inconsistent content is refused."""
    chunk = chunks[0]
    n = _packets(chunk)[0][1]
    body = bytearray(chunk[ccsds.PRIMARY_HEADER_BYTES : n - ccsds.CRC_BYTES])
    body[tlm.SECONDARY.size] = 9  # layout version
    pkt = ccsds.build_packet(apid=tlm.APID_DCE_HEADER, seq_flags=3, seq_count=0, body=bytes(body))
    with pytest.raises(MipsTelemetryError, match="layout version"):
        decode_dce(pkt + chunk[n:])
    body = bytearray(chunk[ccsds.PRIMARY_HEADER_BYTES : n - ccsds.CRC_BYTES])
    struct.pack_into(">H", body, tlm.SECONDARY.size + 23, 3)  # nplanes: payload size mismatch
    pkt = ccsds.build_packet(apid=tlm.APID_DCE_HEADER, seq_flags=3, seq_count=0, body=bytes(body))
    with pytest.raises(MipsTelemetryError, match="payload bytes"):
        decode_dce(pkt + chunk[n:])


def test_crc16_is_ccsds() -> None:
    # CRC-16/CCITT-FALSE check value of "123456789"
    assert ccsds.crc16_ccitt(b"123456789") == 0x29B1
