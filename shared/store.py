"""The product store: one async interface over obstore (local directory, S3-compatible, memory).

URLs: a plain path or `file:///abs/path` (local directory, the embedded default),
`s3://bucket/prefix` (credentials and endpoint from the environment: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` e.g. `http://127.0.0.1:9000` for MinIO),
`memory:///` (tests). Keys are relative, '/'-separated, validated: no `..`, no absolute paths.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import obstore
import obstore.exceptions
from obstore.store import LocalStore, MemoryStore, S3Store

from shared.errors import StoreKeyError, Transient
from shared.messages import StoredObject

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]*$")


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise `StoreKeyError`."""
    if not key or key.startswith("/") or "\\" in key:
        raise StoreKeyError(f"object key {key!r} must be a non-empty relative path")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _KEY_PART.match(part):
            raise StoreKeyError(
                f"object key {key!r} has an invalid part {part!r}: use letters, digits and ._+=@,-"
            )
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    """Async put/get/list of products; the one place that talks to obstore."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = urlparse(url)
        scheme = parsed.scheme or "file"
        if scheme == "file":
            root = Path(parsed.path if parsed.scheme else url).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            self.root: Path | None = root
            self._store: LocalStore | MemoryStore | S3Store = LocalStore(root, mkdir=True)
        elif scheme == "memory":
            self.root = None
            self._store = MemoryStore()
        elif scheme in ("s3", "s3a"):
            self.root = None
            endpoint = os.environ.get("AWS_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
            options = {"allow_http": True} if endpoint and endpoint.startswith("http:") else {}
            config: dict[str, str] = {}
            if endpoint:
                config["endpoint"] = endpoint
            config.setdefault("region", os.environ.get("AWS_REGION", "us-east-1"))
            self._store = S3Store(
                parsed.netloc,
                prefix=parsed.path.strip("/") or None,
                config=config,  # type: ignore[arg-type]
                client_options=options,  # type: ignore[arg-type]
            )
        else:
            raise ValueError(
                f"store URL {url!r}: use a directory path, file:///path, s3://bucket/prefix "
                "or memory:///"
            )

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    async def put(
        self, key: str, data: bytes, *, role: str = "primary", name: str = ""
    ) -> StoredObject:
        """Write `data` at `key` (overwriting: keys are deterministic, rewrites are idempotent)."""
        validate_key(key)
        try:
            await obstore.put_async(self._store, key, data)
        except (OSError, RuntimeError, obstore.exceptions.BaseError) as exc:
            # network, disk or permission trouble: try again later
            raise Transient(f"store put {key}: {exc}") from exc
        return StoredObject(key=key, size=len(data), sha256=sha256_hex(data), role=role, name=name)

    async def get(self, key: str) -> bytes:
        validate_key(key)
        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "NotFoundError" or "not found" in str(exc).lower():
                raise FileNotFoundError(key) from exc
            raise Transient(f"store get {key}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            await obstore.head_async(self._store, key)
        except Exception:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix`, sorted."""
        if prefix:
            validate_key(prefix.rstrip("/"))
        keys: list[str] = []
        try:
            stream = obstore.list(self._store, prefix=prefix or None)
            async for batch in stream:
                keys.extend(str(meta["path"]) for meta in batch)
        except (OSError, RuntimeError, obstore.exceptions.BaseError) as exc:
            raise Transient(f"store list {prefix!r}: {exc}") from exc
        return sorted(keys)

    async def verify(self, obj: StoredObject) -> bool:
        """True if the object exists with the recorded size and sha256."""
        try:
            data = await self.get(obj.key)
        except FileNotFoundError:
            return False
        return len(data) == obj.size and sha256_hex(data) == obj.sha256
