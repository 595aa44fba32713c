"""The ingest service on a real nats-server with one archive submission: gzip BCDs, a 24 + 70 um
AOR with fbcd files, a truncated BCD and one with a corrupt header."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import pytest

from shared import subjects
from shared.cli import make_service
from shared.embedded import EmbeddedNats
from shared.messages import DeadLetter, ProductRef, Submission, encode, encode_file_list
from shared.runtime import RuntimeSettings, ServiceRunner
from shared.store import ObjectStore
from tests.ingest import archive
from tests.platform.helpers import setup_bus, stream_messages, wait_for


def _write_inputs(folder: Path) -> dict[str, bytes]:
    """24 um DCEs 0-2 (DCE 0 gzipped, DCE 1's BCD also as .gz), a truncated DCE 3 and a
    header-damaged DCE 4 (with their bunc + bbmsk); 70 um DCEs 0-1 with fbcd. Returns the
    uncompressed bytes by name."""
    folder.mkdir()
    plain: dict[str, bytes] = {}
    for dce in range(5):
        plain.update(archive.triplet(1, dce))
    for dce in range(2):
        plain.update(archive.triplet(2, dce))
        fbcd = archive.spitzer_name(2, dce, "fbcd")
        plain[fbcd] = archive.product(2, dcenum=dce, kind="fbcd", filename=fbcd)
    for name, data in plain.items():
        if "_0000_2_" in name and name.startswith("SPITZER_M1"):
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    # the same file twice, plain and gzipped: one copy is used, nothing is reported
    twice = archive.spitzer_name(1, 1, "bcd")
    (folder / f"{twice}.gz").write_bytes(gzip.compress(plain[twice]))
    truncated = folder / archive.spitzer_name(1, 3, "bcd")
    truncated.write_bytes(truncated.read_bytes()[: 2880 + 300])
    damaged = folder / archive.spitzer_name(1, 4, "bcd")
    raw = bytearray(damaged.read_bytes())
    at = raw.find(b"EXPTIME =")
    raw[at : at + 40] = bytes(range(128, 168))
    damaged.write_bytes(bytes(raw))
    return plain


@pytest.mark.parametrize("listed", ["inline", "manifest"])
async def test_archive_submission(
    nats_server: EmbeddedNats, store: ObjectStore, tmp_path: Path, listed: str
) -> None:
    """The files listed in the message itself, or (as `skybus run` sends them, since ~4000
    files pass the bus's 1 MiB message limit) in a manifest in the store: the same products
    and dead letters."""
    plain = _write_inputs(tmp_path / "in")
    files = tuple(
        [
            await store.put(f"inputs/t/{p.name}", p.read_bytes(), role="input", name=p.name)
            for p in sorted((tmp_path / "in").iterdir())
        ]
    )
    nc, js = await setup_bus(nats_server.url)
    if listed == "manifest":
        manifest = await store.put("inputs/t/manifest.json", encode_file_list(files),
                                   role="manifest", name="manifest.json")
        submission = Submission(run_id="t", manifest=manifest)
    else:
        submission = Submission(run_id="t", files=files)
    await js.publish(
        subjects.product_subject(subjects.Level.INPUT, "any", "submission"), encode(submission)
    )
    stop = asyncio.Event()
    runner = ServiceRunner(
        make_service("ingest"), nats_url=nats_server.url, store=store, settings=RuntimeSettings()
    )
    task = asyncio.create_task(runner.run(stop))

    async def done() -> bool:
        if runner.processed < 1:
            return False  # (its consumer may not exist yet)
        info = await js.consumer_info(
            subjects.stream_name(subjects.Level.INPUT), subjects.durable_name("ingest")
        )
        return info.num_pending == 0 and info.num_ack_pending == 0

    await wait_for(done, timeout_s=60)
    refs = [
        m for _, m in await stream_messages(js, subjects.stream_name(subjects.Level.CALIBRATED))
    ]
    dead = [m for _, m in await stream_messages(js, subjects.DEADLETTER_STREAM)]
    stop.set()
    await task
    await nc.drain()

    assert all(isinstance(r, ProductRef) for r in refs)
    by_ch: dict[int, list[ProductRef]] = {}
    for r in refs:
        assert isinstance(r, ProductRef)
        by_ch.setdefault(int(r.obs.channel or 0), []).append(r)
    # P2/P5a: the truncated and the damaged BCD are out, the rest of the AOR goes on
    assert sorted(int(r.obs.dcenum or 0) for r in by_ch[1]) == [0, 1, 2]
    assert {r.group.count for r in by_ch[1] if r.group} == {3}
    # P7: both bands say which channels the AOR has, so extract band-merges them
    assert {r.meta["aor_channels"] for r in refs} == {"1,2"}
    # P3: the gzipped DCE is stored decompressed, under its name without ".gz"
    gz = next(r for r in by_ch[1] if r.obs.dcenum == 0)
    names = [o.name for o in (gz.primary, *gz.companions)]
    assert gz.key.endswith(archive.spitzer_name(1, 0, "bcd"))
    assert all(not n.endswith(".gz") for n in names), names
    assert await store.get(gz.key) == plain[archive.spitzer_name(1, 0, "bcd")]
    # P6: fbcd travels with its BCD as a companion
    for r in by_ch[2]:
        fbcd = r.file("fbcd")
        assert fbcd is not None
        assert fbcd.name == archive.spitzer_name(2, int(r.obs.dcenum or 0), "fbcd")
    reasons = {d.item: d.reason for d in dead if isinstance(d, DeadLetter)}
    assert not any("fbcd" in item for item in reasons), reasons
    bad3, bad4 = archive.spitzer_name(1, 3, "bcd"), archive.spitzer_name(1, 4, "bcd")
    assert reasons[bad3] == (
        f"{bad3}: truncated: header promises 1024 bytes of data, file has 300; re-download it"
    )
    assert reasons[bad4].startswith(f"{bad4}: corrupt header: card ")
    assert "non-ASCII" in reasons[bad4]
    # their companions are reported as orphans, nothing else is dead-lettered
    assert set(reasons) == {
        bad3,
        bad4,
        *(archive.spitzer_name(1, d, k) for d in (3, 4) for k in ("bunc", "bbmsk")),
    }
