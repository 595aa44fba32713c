"""Service configuration: closed Structs, precedence CLI > env > file > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mosaic.service import MosaicConfig
from shared.config import load_config
from shared.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config(MosaicConfig, service="mosaic", environ={})
    assert cfg == MosaicConfig()


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "skybus.toml"
    file.write_text("[mosaic]\noutlier_sigma = 3.0\npixel_arcsec = 2.0\nself_flat = true\n")
    env = {"SKYBUS_MOSAIC_OUTLIER_SIGMA": "5.5", "SKYBUS_MOSAIC_PIXEL_ARCSEC": "3.0"}
    cfg = load_config(
        MosaicConfig, service="mosaic", file=file, environ=env, overrides={"pixel_arcsec": "1.5"}
    )
    assert cfg.self_flat is True  # file
    assert cfg.outlier_sigma == 5.5  # env over file
    assert cfg.pixel_arcsec == 1.5  # CLI over env


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError, match="outlier_sigmaa"):
        load_config(MosaicConfig, service="mosaic", environ={}, overrides={"outlier_sigmaa": "3"})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match="outlier_sigma"):
        load_config(MosaicConfig, service="mosaic", environ={}, overrides={"outlier_sigma": "many"})
