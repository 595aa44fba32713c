"""Astrometry over many simulated skies: how much of a band's positional RMS is the sample.

The acceptance tests (`test_mips_truth.py`) measure one sky, the default AOR's, where the
70 um sample with true S/N > 20 holds ~30 sources: its RMS then moves by +-15% with the sky
alone. This study runs the whole pipeline (embedded NATS, the five services) on the default
AOR with other seeds (a new sky, new noise) and applies the tests' own definitions (in the
field, unconfused, true S/N, mutual matches) to every run. Per band it reports:

- the RMS per axis of detection - truth over sources with true S/N > 20, per sky and pooled;
- the *bound*: the RMS of the stated uncertainties (delta_RA, delta_Dec: the inverse Fisher
  matrix of the fit, i.e. the Cramer-Rao bound of that sample), which an unbiased estimator
  cannot beat on average;
- chi: the RMS of error / stated uncertainty, overall and by true S/N;
- chi once the *predicted confusion bias* is removed: the first-order pull of the truth sources
  that were not detected (below the detection limit, so no fit can deblend them) on a
  Gaussian-PSF fit, sum_j (f_j / f_i) d_ij exp(-d_ij^2 / 4 sigma^2) over those neighbours.

Run: python -m tests.integration.skies [--skies 10] [--first-seed 11] [--markdown PATH].
Each sky takes ~30 s here (after the kernels' one-off compile).
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from shared import logs
from simulator import mips
from tests.integration import test_mips_truth as truth
from tests.integration.conftest import run_simulated_aor

SNR_MIN = 20.0
SNR_BINS = (20.0, 50.0, 100.0, 200.0, math.inf)


@dataclass
class BandSample:
    """Matched unconfused in-field sources with true S/N > SNR_MIN of one band on one sky."""

    seed: int
    channel: int
    east: np.ndarray  #: detection - truth along RA*cos(Dec) (arcsec)
    north: np.ndarray  #: detection - truth along Dec (arcsec)
    sigma_east: np.ndarray  #: stated delta_RA (arcsec)
    sigma_north: np.ndarray  #: stated delta_Dec (arcsec)
    snr: np.ndarray  #: true S/N
    bias_east: np.ndarray  #: predicted pull of undetected truth neighbours (arcsec)
    bias_north: np.ndarray

    def subset(self, keep: np.ndarray) -> BandSample:
        """The sources selected by `keep`."""
        arrays = {f.name: getattr(self, f.name)[keep] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays)


def confusion_bias(east: np.ndarray, north: np.ndarray, flux: np.ndarray, detected: np.ndarray,
                   *, fwhm_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """First-order position pull on every source of a Gaussian-PSF fit by the sources that were
    not detected: a neighbour of flux ratio r at offset d moves the fitted centre by
    r d exp(-|d|^2 / 4 sigma^2) (the linearised least-squares shift for two Gaussians)."""
    sigma = fwhm_arcsec / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    de = east[None, :] - east[:, None]
    dn = north[None, :] - north[:, None]
    w = np.exp(-(de**2 + dn**2) / (4.0 * sigma**2)) * flux[None, :] / flux[:, None]
    np.fill_diagonal(w, 0.0)
    w[:, detected] = 0.0
    return (w * de).sum(axis=1), (w * dn).sum(axis=1)


def band_sample(run: object, seed: int, channel: int) -> BandSample:
    """The acceptance test's sample (`test_mips_truth.astrometry_sample`) on `run`, with the
    predicted pull of the undetected truth sources on each."""
    b = truth.band(run, channel)  # type: ignore[arg-type]
    a = truth.astrometry_sample(b, SNR_MIN)
    t = b.truth
    ti, _, _ = truth.match(b, b.sources)
    detected = np.zeros(len(t), dtype=bool)
    detected[ti] = True
    te, tn = truth._offsets_arcsec(t["ra"], t["dec"], float(np.mean(t["ra"])),
                                   float(np.mean(t["dec"])))
    be, bn = confusion_bias(te, tn, np.asarray(t["flux"], dtype=float), detected,
                            fwhm_arcsec=b.fwhm_arcsec)
    ts = a.truth_index
    return BandSample(seed, channel, a.east, a.north, a.sigma_east, a.sigma_north,
                      np.asarray(t["snr"], dtype=float)[ts], be[ts], bn[ts])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else math.nan


def _row(label: str, s: BandSample | list[BandSample]) -> str:
    parts = s if isinstance(s, list) else [s]

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    e, n, se, sn = cat("east"), cat("north"), cat("sigma_east"), cat("sigma_north")
    ce, cn = e - cat("bias_east"), n - cat("bias_north")
    return (f"| {label} | {e.size} | {_rms(e):.3f} / {_rms(n):.3f} | {_rms(se):.3f} / "
            f"{_rms(sn):.3f} | {_rms(e / se):.2f} / {_rms(n / sn):.2f} | "
            f"{_rms(ce / se):.2f} / {_rms(cn / sn):.2f} |")


def report(samples: list[BandSample]) -> str:
    """Markdown: per band, one row per sky, the pooled row, and chi by true S/N."""
    out = []
    for ch in sorted({s.channel for s in samples}):
        band = [s for s in samples if s.channel == ch]
        name = truth.BANDS.get(ch, f"ch{ch}")
        out += [f"### {name}: true S/N > {SNR_MIN:g}, per axis (RA*cos(Dec) / Dec)", "",
                "| sky (seed) | n | RMS (\") | bound: RMS of stated (\") | chi | chi minus "
                "confusion |", "|---|---|---|---|---|---|"]
        out += [_row(str(s.seed), s) for s in band]
        out.append(_row("**pooled**", band))
        worst = [max(_rms(s.east), _rms(s.north)) for s in band]
        out += ["", f"Worse axis per sky: median {float(np.median(worst)):.3f}\", range "
                f"{min(worst):.3f}-{max(worst):.3f}\"; {sum(w <= 0.3 for w in worst)} of "
                f"{len(worst)} skies at or below 0.3\".", "",
                "| true S/N | n | RMS (\") | bound (\") | chi | chi minus confusion |",
                "|---|---|---|---|---|---|"]
        for lo, hi in itertools.pairwise(SNR_BINS):
            cut = [s.subset((s.snr > lo) & (s.snr <= hi)) for s in band]
            out.append(_row(f"{lo:g}-{hi:g}", cut))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.integration.skies",
        description="Run the default MIPS AOR on several skies (seeds) through the whole "
                    "pipeline and report the astrometry of each band against the truth, with "
                    "the Cramer-Rao bound of each sample and the confusion by undetected "
                    "neighbours.")
    p.add_argument("--skies", type=int, default=10, help="number of skies (default 10)")
    p.add_argument("--first-seed", type=int, default=11, help="seed of the first sky")
    p.add_argument("--default-sky", action="store_true",
                   help="include the default AOR's own sky (its seed) as the first")
    p.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    logs.configure(level="warning")
    seeds = ([mips.MipsAORConfig().seed] if args.default_sky else []) + list(
        range(args.first_seed, args.first_seed + args.skies))
    samples: list[BandSample] = []
    work = Path(tempfile.mkdtemp(prefix="skybus_skies_"))
    try:
        for k, seed in enumerate(seeds, 1):
            t0 = time.monotonic()
            root = work / str(seed)
            root.mkdir()
            run = run_simulated_aor(mips.MipsAORConfig(seed=seed), root)
            for ch in (1, 2):
                samples.append(band_sample(run, seed, ch))
            shutil.rmtree(root, ignore_errors=True)
            truth.release(run)  # the band cache holds each run's images and frames
            line = ", ".join(f"{truth.BANDS[s.channel]} n={s.east.size} RMS "
                             f"{_rms(s.east):.3f}/{_rms(s.north):.3f}\""
                             for s in samples[-2:])
            print(f"[{k}/{len(seeds)}] sky {seed}: {line} ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(samples)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
