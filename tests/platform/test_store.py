"""The product store (`shared.store.ObjectStore`): a local directory, and S3 against moto_server.

The S3 tests speak the real S3 protocol to a local `moto_server` (from moto[server]), the one
S3 endpoint installable here; they skip only if moto_server or boto3 is missing.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.errors import StoreKeyError, Transient
from shared.store import ObjectStore, validate_key

KEYS = {
    "mips/aor_0012345/SPITZER_M1_12345_0001_0001_2_bcd.fits": b"SIMPLE  =                    T",
    "mips/aor_0012345/SPITZER_M1_12345_0001_0001_2_bunc.fits": b"uncertainty",
    "tauvex/scan_7/level1b/frame=1@x,y+z.fits": b"odd but legal characters",
}

BAD_KEYS = {
    "": "empty",
    "../escape.fits": "parent directory",
    "mips/../../escape.fits": "parent directory inside",
    "/etc/passwd": "absolute",
    "mips//bcd.fits": "empty part",
    "mips/": "trailing slash",
    "mips\\bcd.fits": "backslash",
    "./bcd.fits": "current directory",
    "mips/.hidden": "part starting with a dot",
    "mips/bcd fits": "space",
}


# --- local directory ------------------------------------------------------------------------


async def test_put_get_round_trip(store: ObjectStore) -> None:
    for key, data in KEYS.items():
        obj = await store.put(key, data, role="bcd", name=Path(key).name)
        assert obj.key == key
        assert obj.size == len(data)
        assert obj.sha256 == hashlib.sha256(data).hexdigest()
        assert (obj.role, obj.name) == ("bcd", Path(key).name)
    for key, data in KEYS.items():
        assert await store.get(key) == data
    assert store.root is not None
    assert (store.root / next(iter(KEYS))).read_bytes() == next(iter(KEYS.values()))


async def test_list_is_sorted_and_filters_by_prefix(store: ObjectStore) -> None:
    assert await store.list() == []
    for key, data in reversed(KEYS.items()):
        await store.put(key, data)
    assert await store.list() == sorted(KEYS)
    assert await store.list("mips") == sorted(k for k in KEYS if k.startswith("mips/"))
    assert await store.list("tauvex/scan_7/") == ["tauvex/scan_7/level1b/frame=1@x,y+z.fits"]
    assert await store.list("isocam") == []


async def test_exists(store: ObjectStore) -> None:
    key = next(iter(KEYS))
    assert not await store.exists(key)
    await store.put(key, KEYS[key])
    assert await store.exists(key)
    assert not await store.exists("mips/aor_0012345")  # a "directory" is not an object


async def test_get_missing_raises_file_not_found(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError):
        await store.get("mips/nothing_here.fits")


async def test_verify_checks_size_and_checksum(store: ObjectStore) -> None:
    key, data = next(iter(KEYS.items()))
    obj = await store.put(key, data)
    assert await store.verify(obj)
    assert store.root is not None
    (store.root / key).write_bytes(data[:-1] + b"X")  # same size, different bytes
    assert not await store.verify(obj)
    (store.root / key).write_bytes(data + b"!")  # different size
    assert not await store.verify(obj)
    (store.root / key).unlink()
    assert not await store.verify(obj)


async def test_rewriting_a_key_is_idempotent(store: ObjectStore) -> None:
    key, data = next(iter(KEYS.items()))
    first = await store.put(key, data, role="bcd")
    second = await store.put(key, data, role="bcd")
    assert first == second
    assert await store.list() == [key]
    assert await store.get(key) == data
    assert await store.verify(first)
    # a different content at the same key replaces it (keys carry the version, not the bytes)
    third = await store.put(key, b"reprocessed")
    assert await store.get(key) == b"reprocessed"
    assert await store.verify(third) and not await store.verify(first)


@pytest.mark.parametrize("key", list(BAD_KEYS), ids=list(BAD_KEYS.values()))
async def test_bad_keys_are_rejected_readably(store: ObjectStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreKeyError) as info:
        validate_key(key)
    message = str(info.value)
    assert repr(key) in message, "the error names the offending key"
    assert "relative path" in message or "invalid part" in message
    assert isinstance(info.value, ValueError)  # bad input, never a transient failure
    for call in (store.put(key, b"x"), store.get(key), store.exists(key)):
        with pytest.raises(StoreKeyError):
            await call
    assert not (tmp_path / "escape.fits").exists()
    assert await store.list() == []


def test_good_keys_are_returned_unchanged() -> None:
    for key in KEYS:
        assert validate_key(key) == key


def test_local_urls(tmp_path: Path) -> None:
    assert ObjectStore(str(tmp_path / "a")).root == (tmp_path / "a").resolve()
    assert ObjectStore(f"file://{tmp_path / 'b'}").root == (tmp_path / "b").resolve()
    assert (tmp_path / "b").is_dir()  # created at start-up, not at the first put


def test_unknown_scheme_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"s3://bucket/prefix"):
        ObjectStore("ftp://example.org/products")


# --- S3 through moto_server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for this module; always terminated."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip(f"moto_server not installed ({exe}); pip install 'moto[server]'")
    port = _free_port()
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"moto_server exited with {proc.returncode} before listening")
                if time.monotonic() > deadline:
                    pytest.fail("moto_server did not listen within 15 s")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """A fresh bucket on moto, the AWS_* environment pointing at it; yields (bucket, client)."""
    boto3 = pytest.importorskip("boto3", reason="boto3 not installed")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = f"skybus-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for name, value in {**creds, "AWS_ENDPOINT": moto_endpoint, "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    yield bucket, client


async def test_s3_round_trip(s3: tuple[str, Any]) -> None:
    bucket, client = s3
    store = ObjectStore(f"s3://{bucket}/products")
    assert store.root is None
    objs = {key: await store.put(key, data) for key, data in KEYS.items()}
    for key, data in KEYS.items():
        assert await store.get(key) == data
        assert await store.exists(key)
        assert await store.verify(objs[key])
    assert await store.list() == sorted(KEYS)
    assert await store.list("mips") == sorted(k for k in KEYS if k.startswith("mips/"))
    assert not await store.exists("mips/nothing_here.fits")
    # keys live under the URL's prefix in the bucket, byte for byte
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"products/{k}" for k in KEYS)
    key = next(iter(KEYS))
    body = client.get_object(Bucket=bucket, Key=f"products/{key}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == objs[key].sha256


async def test_s3_missing_key_and_tampering(s3: tuple[str, Any]) -> None:
    bucket, client = s3
    store = ObjectStore(f"s3://{bucket}/products")
    with pytest.raises(FileNotFoundError):
        await store.get("mips/nothing_here.fits")
    key, data = next(iter(KEYS.items()))
    obj = await store.put(key, data)
    client.put_object(Bucket=bucket, Key=f"products/{key}", Body=b"tampered")
    assert not await store.verify(obj)


async def test_s3_rewriting_a_key_is_idempotent(s3: tuple[str, Any]) -> None:
    bucket, _ = s3
    store = ObjectStore(f"s3://{bucket}")  # no prefix: keys at the bucket root
    key, data = next(iter(KEYS.items()))
    assert await store.put(key, data) == await store.put(key, data)
    assert await store.list() == [key]
    assert await store.get(key) == data


async def test_s3_rejects_bad_keys_before_any_request(s3: tuple[str, Any]) -> None:
    bucket, client = s3
    store = ObjectStore(f"s3://{bucket}/products")
    for key in ("../escape.fits", "/abs.fits", "a//b.fits", "a\\b.fits"):
        with pytest.raises(StoreKeyError):
            await store.put(key, b"x")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


async def test_s3_store_trouble_is_transient(s3: tuple[str, Any]) -> None:
    store = ObjectStore(f"s3://missing-{uuid.uuid4().hex[:8]}/products")
    with pytest.raises(Transient):
        await store.list()
