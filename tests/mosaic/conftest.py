"""Shared synthetic data for the mosaic tests (built once per session: it takes ~1 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import mosaic_synth

from services.mosaic import Mosaic, build_mosaic


@pytest.fixture(scope="session")
def field() -> tuple[list, mosaic_synth.Truth]:
    """24 dithered, rotated MIPS-24 frames with offsets of 5x the pixel noise."""
    return mosaic_synth.make_frames(24, seed=3, noise_mjysr=0.05, offsets_sigma=0.25)


@pytest.fixture(scope="session")
def mosaic(field) -> Mosaic:
    frames, _truth = field
    return build_mosaic(frames)
