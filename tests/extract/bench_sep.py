"""Timing of extract_sources against sep on one 1000x1000 synthetic 24 um mosaic (~300 sources).

Run by hand: `python -m tests.extract.bench_sep` from the repository root (needs `sep`). Not a
test: timings depend on the machine and are reported, never asserted.
"""

from __future__ import annotations

import time

import numpy as np

from services.extract import extract_sources

from .synth import make_mosaic


def main(repeat: int = 3) -> None:
    import sep

    m = make_mosaic(shape=(1000, 1000), n_sources=300, snr_range=(3.0, 300.0), seed=99)
    img = m.image.astype(np.float64)
    unc = m.unc.astype(np.float64)

    def run_sep() -> int:
        bkg = sep.Background(img, bw=39, bh=39)
        sub = img - bkg.back()
        objs = sep.extract(sub, 5.0, err=unc, minarea=3, filter_type="matched")
        flux, _, _ = sep.sum_circle(sub, objs["x"], objs["y"], 7.0 / 2.45, err=unc, subpix=0)
        return int(flux.size)

    def run_ours() -> int:
        t = extract_sources(img, unc, m.coverage, m.header, fwhm_arcsec=None, band_name="24um")
        return len(t)

    runs = (("sep (bkg+extract+sum_circle)", run_sep), ("skybus extract_sources", run_ours))
    for name, fn in runs:
        fn()  # warm up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t0)
        print(f"{name}: best {min(times) * 1e3:.0f} ms, median {np.median(times) * 1e3:.0f} ms, "
              f"{n} sources")


if __name__ == "__main__":
    main()
