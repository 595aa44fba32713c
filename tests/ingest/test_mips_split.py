"""Splitting MIPS AOR telemetry into DCEs: clean files, and every kind of corruption."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from astropy.io import fits

from services.decode.mips import decode_dce
from services.decode.mips import telemetry as tlm
from services.ingest.mips import MipsSplit, NotMipsTelemetryError, split_aor_telemetry
from shared import ccsds
from simulator.mips import SimulatedAOR


def _packets(data: bytes) -> list[tuple[int, ccsds.PrimaryHeader]]:
    out, pos = [], 0
    while pos < len(data):
        ph = ccsds.PrimaryHeader.unpack(data, pos)
        out.append((pos, ph))
        pos += ph.packet_bytes
    return out


def _ident(h: fits.Header) -> tuple[int, int, int, int]:
    return (h["AORKEY"], h["CHNLNUM"], h["EXPID"], h["DCENUM"])


def _dce_packets(data: bytes, k: int) -> list[tuple[int, ccsds.PrimaryHeader]]:
    """Packets of the k-th DCE of the file (header packet first)."""
    pk = _packets(data)
    heads = [i for i, (_, ph) in enumerate(pk) if ph.apid == tlm.APID_DCE_HEADER]
    end = heads[k + 1] if k + 1 < len(heads) else len(pk)
    return pk[heads[k] : end]


def _assert_rest_intact(split: MipsSplit, sim: SimulatedAOR, lost: set[int]) -> None:
    """Every DCE except the indices in `lost` is returned and decodes bit for bit."""
    want = [h for i, h in enumerate(sim.raw_dces) if i not in lost]
    assert [(c.aorkey, c.channel, c.expid, c.dcenum) for c in split.chunks] == [
        _ident(h[0].header) for h in want
    ]
    for chunk, ref in zip(split.chunks, want, strict=True):
        assert np.array_equal(decode_dce(chunk.data)[0].data, ref[0].data)


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x5A
    return bytes(b)


def test_clean_split(small_aor: SimulatedAOR) -> None:
    split = split_aor_telemetry(small_aor.telemetry)
    assert split.problems == []
    assert split.aorkeys == (small_aor.config.aorkey,)
    _assert_rest_intact(split, small_aor, set())
    for chunk, ref in zip(split.chunks, small_aor.raw_dces, strict=True):
        h = ref[0].header
        assert chunk.n_dce_in_group == h["NDCEGRP"]
        assert chunk.is_stim == bool(h.get("STIMFLSH", False))
        assert chunk.raw_name() == (
            f"SPITZER_M{h['CHNLNUM']}_{h['AORKEY']}_{h['EXPID']:04d}_{h['DCENUM']:04d}_1_raw.fits"
        )
    assert split.n_packets == len(_packets(small_aor.telemetry))


@pytest.mark.parametrize("k", [0, 4, -1])
def test_bad_crc_in_array_packet_loses_only_its_dce(small_aor: SimulatedAOR, k: int) -> None:
    data = small_aor.telemetry
    k = k % len(small_aor.raw_dces)
    off, ph = _dce_packets(data, k)[1]
    split = split_aor_telemetry(_flip(data, off + ph.packet_bytes // 2))
    kinds = [p.kind for p in split.problems]
    assert "bad_crc" in kinds and "incomplete_dce" in kinds
    assert split.lost_dces == [_ident(small_aor.raw_dces[k][0].header)]
    _assert_rest_intact(split, small_aor, {k})


def test_bad_crc_in_header_packet_orphans_its_data(small_aor: SimulatedAOR) -> None:
    data = small_aor.telemetry
    off, _ = _dce_packets(data, 3)[0]
    split = split_aor_telemetry(_flip(data, off + 20))
    assert [p.kind for p in split.problems] == ["bad_crc", "orphan_packets"]
    assert split.lost_dces == [_ident(small_aor.raw_dces[3][0].header)]
    assert "without their DCE header" in split.problems[1].reason
    _assert_rest_intact(split, small_aor, {3})


def test_bad_length_field_resyncs(small_aor: SimulatedAOR) -> None:
    data = bytearray(small_aor.telemetry)
    off, ph = _dce_packets(bytes(data), 5)[2]
    struct.pack_into(">H", data, off + 4, ph.data_length + 1000)
    split = split_aor_telemetry(bytes(data))
    assert "bad_length" in [p.kind for p in split.problems]
    bad = next(p for p in split.problems if p.kind == "bad_length")
    assert bad.offset == off and "next valid packet" in bad.reason
    _assert_rest_intact(split, small_aor, {5})


def test_garbage_apid_field_resyncs(small_aor: SimulatedAOR) -> None:
    data = bytearray(small_aor.telemetry)
    off, _ = _dce_packets(bytes(data), 2)[1]
    data[off] = 0xFF  # version 7, nonsense APID: the packet boundary cannot be trusted
    split = split_aor_telemetry(bytes(data))
    assert split.problems[0].kind == "bad_length"
    _assert_rest_intact(split, small_aor, {2})


def test_truncated_file(small_aor: SimulatedAOR) -> None:
    data = small_aor.telemetry
    last = len(small_aor.raw_dces) - 1
    off, ph = _dce_packets(data, last)[2]
    split = split_aor_telemetry(data[: off + ph.packet_bytes // 2])
    assert [p.kind for p in split.problems] == ["truncated", "incomplete_dce"]
    assert "needs" in split.problems[0].reason
    _assert_rest_intact(split, small_aor, {last})
    # cut inside a primary header
    split = split_aor_telemetry(data[: off + 3])
    assert split.problems[0].kind == "truncated"
    _assert_rest_intact(split, small_aor, {last})


def test_missing_packet_is_a_sequence_gap(small_aor: SimulatedAOR) -> None:
    data = small_aor.telemetry
    off, ph = _dce_packets(data, 1)[2]
    split = split_aor_telemetry(data[:off] + data[off + ph.packet_bytes :])
    kinds = [p.kind for p in split.problems]
    assert "sequence_gap" in kinds and "incomplete_dce" in kinds
    gap = next(p for p in split.problems if p.kind == "sequence_gap")
    assert "1 packet(s) missing" in gap.reason and gap.apid == ph.apid
    _assert_rest_intact(split, small_aor, {1})


def test_unknown_apid_packet_is_skipped(small_aor: SimulatedAOR) -> None:
    data = small_aor.telemetry
    off, _ = _dce_packets(data, 2)[0]
    alien = ccsds.build_packet(apid=0x123, seq_flags=3, seq_count=0, body=b"\x00" * 40)
    split = split_aor_telemetry(data[:off] + alien + data[off:])
    assert [p.kind for p in split.problems] == ["unknown_apid"]
    assert "0x123" in split.problems[0].reason
    _assert_rest_intact(split, small_aor, set())


def test_garbage_before_first_packet(small_aor: SimulatedAOR) -> None:
    split = split_aor_telemetry(b"\x00\x17junk" * 5 + small_aor.telemetry)
    assert [p.kind for p in split.problems] == ["bad_length"]
    _assert_rest_intact(split, small_aor, set())


def test_not_mips_telemetry_raises() -> None:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(buf)
    with pytest.raises(NotMipsTelemetryError, match="no valid MIPS telemetry packet"):
        split_aor_telemetry(buf.getvalue())
    with pytest.raises(ValueError, match="empty"):
        split_aor_telemetry(b"")
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="MIPS telemetry"):
        split_aor_telemetry(rng.integers(0, 256, 50000, dtype=np.uint8).tobytes())
    # valid CCSDS, but not MIPS
    other = ccsds.build_packet(apid=0x42, seq_flags=3, seq_count=0, body=b"\x01" * 100) * 10
    with pytest.raises(NotMipsTelemetryError):
        split_aor_telemetry(other)
