"""TAUVEX ingest: Level 0 downlink + spacecraft attitude -> Level 1 observations (the "DVD").

Level 1 = Level 0 without filler frames, split per observation (START LOG .. END LOG), with the
spacecraft housekeeping/attitude rows of that observation merged in. Bad frames are counted and
reported as `Problem`s, never silently dropped, and never stop the rest of the stream.
A Level 1 observation is stored as a FITS file: see `shared.instruments.tauvex.Level1Observation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from numpy.typing import NDArray

from shared import fitsio
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
    tab = fitsio.read_bintable(attitude, required=ATTITUDE_COLUMNS, what="attitude input",
                               error=AttitudeError)
    tab.sort("TIME")
    return tab


def _first(idx: NDArray[np.intp]) -> tuple[int, ...]:
    return tuple(int(i) for i in idx[:10])


def _is_filler_body(buf: NDArray[np.uint8], n: int) -> NDArray[np.bool_]:
    """Per frame: bytes 8..127 equal the filler frame's (the sync word is checked apart).

    One comparison of the frames as 16 uint64 words each; the per-frame AND of the 16 equality
    bytes is then read as two uint64 words (a reduction over an axis of 15 is 3x slower).
    """
    words = buf.view(np.uint64).reshape(n, tv.FRAME_BYTES // 8)
    eq = words == tv.FILLER_FRAME.view(np.uint64)
    eq[:, : tv.SYNC_BYTES // 8] = True
    pairs = eq.view(np.uint64)
    return (pairs[:, 0] & pairs[:, 1]) == np.uint64(0x0101010101010101)


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
    buf = np.frombuffer(level0, dtype=np.uint8, count=n_full * tv.FRAME_BYTES)
    allf = buf.reshape(n_full, tv.FRAME_BYTES)
    # Sync check on a strided '>u8' view of each frame's first 8 bytes: no copy.
    sync = np.ndarray((n_full,), dtype=">u8", buffer=buf, strides=(tv.FRAME_BYTES,))
    nbad_bits = np.bitwise_count(sync ^ np.uint64(tv.SYNC_WORD_U64))
    sync_ok = nbad_bits <= tv.SYNC_MAX_BIT_ERRORS
    n_sync_ok = int(np.count_nonzero(sync_ok))
    if n_sync_ok < 0.5 * n_full:
        raise NotTauvexError(
            f"only {n_sync_ok} of {n_full} {tv.FRAME_BYTES}-byte frames start with the "
            f"TAUVEX sync word {tv.SYNC_WORD.hex().upper()}: not TAUVEX Level 0 (or not aligned)"
        )
    corrected = sync_ok & (nbad_bits > 0)
    if corrected.any():
        problems.append(Problem(
            f"sync word with 1..{tv.SYNC_MAX_BIT_ERRORS} bit errors (frame kept)",
            int(corrected.sum()), _first(np.nonzero(corrected)[0])))
    if n_sync_ok < n_full:
        bad = np.nonzero(~sync_ok)[0]
        problems.append(Problem("bad sync word (frame skipped)", int(bad.size), _first(bad)))

    is_filler = sync_ok & _is_filler_body(buf, n_full)
    data_idx = np.flatnonzero(sync_ok & ~is_filler)  # Level 0 index of each data frame
    data = allf[data_idx]
    # Segment kinds and LOG codes from uint8 reads of the segments' last and first bytes.
    first = tv.segment_bytes(data, 0)
    typ = tv.segment_bytes(data, tv.SEGMENT_BYTES - 1) & np.uint8(tv.TYPE_MASK)
    is_log = typ == tv.SegmentType.LOG
    broken = typ == tv.SegmentType.RESERVED
    broken |= (typ == tv.SegmentType.EVENT) & (
        (first >> np.uint8(tv.EVENT_TELE_SHIFT - tv.LOG_CODE_SHIFT)) == 0)
    broken |= is_log & ~tv.LOG_CODE_KNOWN[first]
    if broken.any():
        fb = np.nonzero(broken.any(axis=1))[0]
        problems.append(Problem("broken segment (segment skipped, rest of frame kept)",
                                int(broken.sum()), _first(data_idx[fb])))

    # Observation boundaries: START LOG / END LOG segments (few: a Python loop over markers).
    is_start = is_log & (first == tv.LogCode.START)
    start_f = np.nonzero(is_start.any(axis=1))[0]
    end_f = np.nonzero((is_log & (first == tv.LogCode.END)).any(axis=1))[0]
    # Flat (downlink order) positions of the TIME segments: an observation needs only its
    # first and last one, decoded on their own.
    time_pos = np.flatnonzero(typ == tv.SegmentType.TIME)
    words = tv.segment_words(data)
    att = read_attitude(attitude)
    in_obs = np.zeros(data.shape[0], dtype=bool)
    observations: list[Level1Observation] = []
    for i, f0 in enumerate(start_f):
        nxt = start_f[i + 1] if i + 1 < start_f.size else data.shape[0]
        ends = end_f[(end_f >= f0) & (end_f < nxt)]
        obs_id = int((int(words[f0][is_start[f0]][0]) >> tv.LOG_PAYLOAD_SHIFT)
                     & tv.LOG_PAYLOAD_MASK)
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
        t_lo, t_hi = np.searchsorted(time_pos, [int(f0) * tv.SEGMENTS_PER_FRAME,
                                                f1 * tv.SEGMENTS_PER_FRAME])
        if t_hi == t_lo:
            obs_problems.append(Problem("observation without TIME segments (skipped)", 1,
                                        _first(data_idx[[f0]]), obs_id))
            problems.extend(obs_problems)
            continue
        t0, t1 = (
            (int(words.flat[time_pos[j]]) >> tv.TIME_SHIFT) & tv.TIME_MASK for j in (t_lo, t_hi - 1)
        )
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
        n_filler_frames=int(np.count_nonzero(is_filler)), n_data_frames=int(in_obs.sum()),
        n_sync_corrected=int(corrected.sum()),
    )
