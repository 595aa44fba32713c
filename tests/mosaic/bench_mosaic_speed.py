"""Time build_mosaic on 50 and 200 synthetic 128x128 frames (a script, not a test).

Run: .venv/bin/python tests/mosaic/bench_mosaic_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mosaic_synth

from services.mosaic import build_mosaic


def main() -> None:
    for n in (50, 200):
        frames, _truth = mosaic_synth.make_frames(n, seed=7, dither_arcsec=150.0)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            m = build_mosaic(frames)
            best = min(best, time.perf_counter() - t0)
        print(f"{n} frames -> {m.image.shape} mosaic, {m.n_outliers} outliers: {best:.2f} s")


if __name__ == "__main__":
    main()
