"""Service configuration: one frozen, closed Struct per service, loaded once.

Precedence: command line (`--set field=value`) > environment (`SKYBUS_<SERVICE>_<FIELD>`) >
file (`--config path.toml|.json|.yaml`) > coded default. Wrong config fails at start-up with a
message that names the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from shared.errors import ConfigError

C = TypeVar("C", bound=msgspec.Struct)


def _parse_scalar(text: str) -> Any:
    try:
        return msgspec.json.decode(text.encode())
    except msgspec.DecodeError:
        return text


def load_config(
    kind: type[C],
    *,
    service: str,
    file: str | Path | None = None,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build a `kind` config from file, environment and overrides (in rising precedence)."""
    values: dict[str, Any] = {}
    if file:
        path = Path(file)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        suffix = path.suffix.lower()
        decoded: Any
        if suffix == ".toml":
            decoded = msgspec.toml.decode(raw)
        elif suffix in (".yaml", ".yml"):
            decoded = msgspec.yaml.decode(raw)
        else:
            decoded = msgspec.json.decode(raw)
        section = decoded.get(service, decoded) if isinstance(decoded, dict) else decoded
        values.update(section)
    env = os.environ if environ is None else environ
    prefix = f"SKYBUS_{service.upper()}_"
    fields = {f.name for f in msgspec.structs.fields(kind)}
    for key, text in env.items():
        if key.startswith(prefix):
            name = key[len(prefix) :].lower()
            if name in fields:
                values[name] = _parse_scalar(text)
    for key, text in (overrides or {}).items():
        values[key] = _parse_scalar(text)
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{service} configuration: {exc}") from exc


def describe(config: msgspec.Struct) -> dict[str, Any]:
    """The config as plain data, for the one start-up log line."""
    return msgspec.to_builtins(config)  # type: ignore[no-any-return]
