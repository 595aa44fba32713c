"""Benchmark: TAUVEX Level 0 -> Level 1a decode throughput and Level 1b..1g event rate.

Run: python -m bench.tauvex_decode [--runs N] [--duration-s S] [--long-s L]. Prints medians of
N runs with the process pinned to one CPU (the decode is single-threaded numpy; pinning makes
sure no hidden thread pool flatters the per-core figure) and the ratio to the 1 Mb/s downlink.

The goal (issue 4) is Level 0 -> Level 1a FITS tables at >= 1000x the downlink, measured as
Level 0 bytes / wall time of the whole step (ingest + decode + tables). The per-data-frame line
is the stricter figure for a downlink with no filler. The longer scan (--long-s, default 300 s)
is closer to a real 53-minute block, where the fixed per-product cost no longer dominates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from services.calibrate import tauvex as cal
from services.decode import tauvex as dec
from services.ingest import tauvex as ing
from shared.instruments import tauvex as tv
from simulator import tauvex as sim_mod


def _median_s(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _level0_to_level1a(sim: sim_mod.TauvexSimulation) -> None:
    """The whole step: Level 0 + attitude -> Level 1 observations -> Level 1a FITS tables."""
    r = ing.level0_to_level1(sim.level0, sim.attitude)
    for o in r.observations:
        dec.make_level1a(o)


def _pin_one_core() -> str:
    """Pin this process to one CPU (Linux); returns a note for the report."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration-s", type=float, default=40.0)
    ap.add_argument("--long-s", type=float, default=300.0,
                    help="also time Level 0 -> 1a on a scan this long (0: skip)")
    args = ap.parse_args(argv)
    print(_pin_one_core())
    sim = sim_mod.simulate_scan(sim_mod.ScanConfig(duration_s=args.duration_s))
    downlink_bytes_s = tv.DOWNLINK_BIT_S / 8
    l0_mb = len(sim.level0) / 1e6
    l1 = ing.level0_to_level1(sim.level0, sim.attitude)
    obs = l1.observations[0]
    frames_mb = obs.frames.nbytes / 1e6
    n_events = int(sim.events["tele"].size)
    print(f"scan {args.duration_s:.0f} s: Level 0 {l0_mb:.2f} MB "
          f"({len(sim.level0) // tv.FRAME_BYTES} frames), Level 1 data frames {frames_mb:.2f} MB, "
          f"{n_events} events; median of {args.runs} runs")

    t_core = _median_s(lambda: dec.decode_frames(obs.frames), args.runs)
    print(f"decode core  (Level 1 frames -> event arrays): {frames_mb / t_core:8.1f} MB/s  "
          f"{n_events / t_core / 1e6:6.2f} Mevents/s")
    t_ing = _median_s(lambda: ing.level0_to_level1(sim.level0, sim.attitude), args.runs)
    print(f"ingest       (Level 0 -> Level 1):             {l0_mb / t_ing:8.1f} MB/s  "
          f"x{len(sim.level0) / downlink_bytes_s / t_ing:8.0f} real time")

    t_full = _median_s(lambda: _level0_to_level1a(sim), args.runs)
    print(f"Level 0 -> Level 1a FITS tables (3 telescopes): {l0_mb / t_full:7.1f} MB/s  "
          f"x{len(sim.level0) / downlink_bytes_s / t_full:8.0f} real time (1 Mb/s downlink)")
    # Data-frame bytes only (a busy downlink with no filler): the honest decode rate.
    print(f"   per data-frame byte:                         {frames_mb / t_full:7.1f} MB/s  "
          f"x{obs.frames.nbytes / downlink_bytes_s / t_full:8.0f} real time")
    if args.long_s > 0:
        long_sim = sim_mod.simulate_scan(sim_mod.ScanConfig(duration_s=args.long_s))
        long_frames = sum(o.frames.nbytes for o in
                          ing.level0_to_level1(long_sim.level0, long_sim.attitude).observations)
        t_long = _median_s(lambda: _level0_to_level1a(long_sim), args.runs)
        print(f"   {args.long_s:.0f} s scan ({len(long_sim.level0) / 1e6:.1f} MB Level 0): "
              f"{len(long_sim.level0) / 1e6 / t_long:16.1f} MB/s  "
              f"x{len(long_sim.level0) / downlink_bytes_s / t_long:8.0f} real time; per data-frame "
              f"byte {long_frames / 1e6 / t_long:.1f} MB/s  "
              f"x{long_frames / downlink_bytes_s / t_long:.0f}")

    l1a = dec.make_level1a(obs)
    src = sim.sources
    per_tele = []
    for k in (1, 2, 3):
        bright = np.asarray(src[f"rate_cps_t{k}"]) > 20
        ra, de = np.asarray(src["ra_deg"])[bright], np.asarray(src["dec_deg"])[bright]
        n_k = int(l1a[k]["EVENTS"].header["NCOUNTS"])

        def chain(k: int = k, ra: np.ndarray = ra, de: np.ndarray = de) -> None:
            cal.run_chain(l1a[k], obs.attitude, keep_levels=("1g",), reference_ra_deg=ra,
                          reference_dec_deg=de)

        per_tele.append((n_k, _median_s(chain, args.runs)))
    n = sum(p[0] for p in per_tele)
    t = sum(p[1] for p in per_tele)
    print(f"Level 1a -> 1g (CALC_XY..REGISTER, 7 FITS products each): {n / t / 1e3:7.1f} "
          f"kevents/s  ({n} events in {t:.2f} s; real-time event rate {n / args.duration_s:.0f}/s)")


if __name__ == "__main__":
    main()
