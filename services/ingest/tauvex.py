"""TAUVEX ingest: Level 0 downlink + spacecraft attitude -> Level 1 observations (the "DVD").

Level 1 = Level 0 without filler frames, split per observation (START LOG .. END LOG), with the
spacecraft housekeeping/attitude rows of that observation merged in. Bad frames are counted and
reported as `Problem`s, never silently dropped, and never stop the rest of the stream.
A Level 1 observation is stored as a FITS file: see `shared.instruments.tauvex.Level1Observation`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

from shared.instruments import tauvex as tv
from shared.instruments.tauvex import Level1FormatError, Level1Observation, Problem

__all__ = [
    "AttitudeError", "Level1FormatError", "Level1Observation", "Level1Result", "NotTauvexError",
    "Problem", "level0_to_level1", "read_attitude",
]

#: Columns the spacecraft attitude table must have (TIME: spacecraft clock in s; angles in deg).
ATTITUDE_COLUMNS = ("TIME", *(f"{a}_T{k}" for k in (1, 2, 3) for a in ("RA", "DEC", "ROLL")))


class NotTauvexError(ValueError):
    """The input is not TAUVEX Level 0 telemetry (no 128-byte frames with the sync word)."""


class AttitudeError(ValueError):
    """The spacecraft attitude/housekeeping input cannot be read or lacks required columns."""


@dataclass(slots=True)
class Level1Result:
    """Output of `level0_to_level1`: observations plus an account of every frame."""

    observations: list[Level1Observation]
    problems: list[Problem]
    n_frames: int  #: complete 128-byte frames in the input
    n_filler_frames: int
    n_data_frames: int  #: data frames kept (inside an observation)
    n_sync_corrected: int  #: frames accepted with 1..SYNC_MAX_BIT_ERRORS sync bit errors


def read_attitude(attitude: bytes) -> Table:
    """Spacecraft attitude/housekeeping FITS bytes -> Table sorted by TIME (s)."""
    try:
        with fits.open(io.BytesIO(attitude)) as hdul:
            hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise AttitudeError("attitude input has no BINTABLE extension")
            tab = Table(hdu.data)
    except OSError as exc:
        raise AttitudeError(f"attitude input is not a readable FITS file: {exc}") from exc
    missing = [c for c in ATTITUDE_COLUMNS if c not in tab.colnames]
    if missing:
        raise AttitudeError(f"attitude table lacks columns {missing}; expected {ATTITUDE_COLUMNS}")
    tab.sort("TIME")
    return tab


def _first(idx: NDArray[np.intp]) -> tuple[int, ...]:
    return tuple(int(i) for i in idx[:10])


def level0_to_level1(
    level0: bytes, attitude: bytes, *, attitude_margin_s: float = 1.0
) -> Level1Result:
    """Remove filler, check frames, split per observation and merge the attitude rows.

    `level0` is the downlink byte stream (128-byte major frames, aligned at the start);
    `attitude` the spacecraft attitude/housekeeping FITS table (TIME in s of spacecraft clock).
    Raises `NotTauvexError` when fewer than half of the frames carry the sync word,
    `AttitudeError` when the attitude cannot be read. Every other defect is a `Problem`.
    """
    problems: list[Problem] = []
    n_full, rest = divmod(len(level0), tv.FRAME_BYTES)
    if n_full == 0:
        raise NotTauvexError(
            f"input of {len(level0)} bytes holds no complete {tv.FRAME_BYTES}-byte TAUVEX frame"
        )
    if rest:
        problems.append(Problem(f"truncated final frame ({rest} of {tv.FRAME_BYTES} bytes) "
                                "dropped", 1, (n_full,)))
    allf = np.frombuffer(level0, dtype=np.uint8, count=n_full * tv.FRAME_BYTES)
    allf = allf.reshape(n_full, tv.FRAME_BYTES)
    sync = np.ascontiguousarray(allf[:, : tv.SYNC_BYTES]).view(">u8").ravel()
    nbad_bits = np.bitwise_count(sync ^ np.uint64(tv.SYNC_WORD_U64))
    sync_ok = nbad_bits <= tv.SYNC_MAX_BIT_ERRORS
    if sync_ok.mean() < 0.5:
        raise NotTauvexError(
            f"only {int(sync_ok.sum())} of {n_full} {tv.FRAME_BYTES}-byte frames start with the "
            f"TAUVEX sync word {tv.SYNC_WORD.hex().upper()}: not TAUVEX Level 0 (or not aligned)"
        )
    corrected = sync_ok & (nbad_bits > 0)
    if corrected.any():
        problems.append(Problem(
            f"sync word with 1..{tv.SYNC_MAX_BIT_ERRORS} bit errors (frame kept)",
            int(corrected.sum()), _first(np.nonzero(corrected)[0])))
    if not sync_ok.all():
        bad = np.nonzero(~sync_ok)[0]
        problems.append(Problem("bad sync word (frame skipped)", int(bad.size), _first(bad)))

    good_idx = np.nonzero(sync_ok)[0]
    body = allf[good_idx, tv.SYNC_BYTES:]
    is_filler = (body == tv.FILLER_FRAME[tv.SYNC_BYTES:]).all(axis=1)
    data_idx = good_idx[~is_filler]  # index in the Level 0 stream of each data frame
    data = allf[data_idx]
    seg = tv.segments_from_frames(data)
    typ = seg & np.uint64(tv.TYPE_MASK)
    is_log = typ == tv.SegmentType.LOG
    code = (seg >> np.uint64(tv.LOG_CODE_SHIFT)) & np.uint64(tv.LOG_CODE_MASK)
    broken = typ == tv.SegmentType.RESERVED
    broken |= (typ == tv.SegmentType.EVENT) & (
        ((seg >> np.uint64(tv.EVENT_TELE_SHIFT)) & np.uint64(tv.EVENT_TELE_MASK)) == 0)
    broken |= is_log & ~np.isin(code, [int(c) for c in tv.LogCode])
    if broken.any():
        fb = np.nonzero(broken.any(axis=1))[0]
        problems.append(Problem("broken segment (segment skipped, rest of frame kept)",
                                int(broken.sum()), _first(data_idx[fb])))

    # Observation boundaries: START LOG / END LOG segments (few: a Python loop over markers).
    start_f = np.nonzero((is_log & (code == tv.LogCode.START)).any(axis=1))[0]
    end_f = np.nonzero((is_log & (code == tv.LogCode.END)).any(axis=1))[0]
    payload = (seg >> np.uint64(tv.LOG_PAYLOAD_SHIFT)) & np.uint64(tv.LOG_PAYLOAD_MASK)
    is_time = typ == tv.SegmentType.TIME
    time_ms = (seg >> np.uint64(tv.TIME_SHIFT)) & np.uint64(tv.TIME_MASK)
    att = read_attitude(attitude)
    in_obs = np.zeros(data.shape[0], dtype=bool)
    observations: list[Level1Observation] = []
    for i, f0 in enumerate(start_f):
        nxt = start_f[i + 1] if i + 1 < start_f.size else data.shape[0]
        ends = end_f[(end_f >= f0) & (end_f < nxt)]
        obs_id = int(payload[f0][is_log[f0] & (code[f0] == tv.LogCode.START)][0])
        obs_problems: list[Problem] = []
        if ends.size:
            f1 = int(ends[0]) + 1
        else:
            f1 = int(nxt)
            obs_problems.append(Problem("no END LOG: observation truncated at next START or "
                                        "end of data", 1, _first(data_idx[[f1 - 1]]), obs_id))
        in_obs[f0:f1] = True
        # Leading filler: count filler frames just before the START frame in the stream.
        lead = int(data_idx[f0]) - (int(data_idx[f0 - 1]) + 1 if f0 > 0 else 0)
        if lead < tv.MIN_LEADING_FILLER_FRAMES:
            obs_problems.append(Problem(f"only {lead} filler frames before START LOG "
                                        f"(expected >= {tv.MIN_LEADING_FILLER_FRAMES})", 1,
                                        _first(data_idx[[f0]]), obs_id))
        times = time_ms[f0:f1][is_time[f0:f1]]
        if times.size == 0:
            obs_problems.append(Problem("observation without TIME segments (skipped)", 1,
                                        _first(data_idx[[f0]]), obs_id))
            problems.extend(obs_problems)
            continue
        t0, t1 = int(times[0]), int(times[-1])
        sel = (att["TIME"] >= t0 / 1000.0 - attitude_margin_s) & (
            att["TIME"] <= t1 / 1000.0 + attitude_margin_s)
        if not sel.any():
            obs_problems.append(Problem("no attitude rows for the observation's time range", 1,
                                        (), obs_id))
        problems.extend(obs_problems)
        observations.append(Level1Observation(
            obs_id=obs_id, frames=np.ascontiguousarray(data[f0:f1]), attitude=att[sel],
            start_ms=t0, end_ms=t1, problems=obs_problems))
    if (~in_obs).any():
        out = np.nonzero(~in_obs)[0]
        problems.append(Problem("data frames outside any START/END LOG observation (skipped)",
                                int(out.size), _first(data_idx[out])))
    return Level1Result(
        observations=observations, problems=problems, n_frames=n_full,
        n_filler_frames=int(is_filler.sum()), n_data_frames=int(in_obs.sum()),
        n_sync_corrected=int(corrected.sum()),
    )
