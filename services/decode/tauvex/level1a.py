"""TAUVEX CRT_LV1A module: a Level 1 observation -> one Level 1a event table per telescope."""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from services.decode.tauvex import validate
from services.decode.tauvex.frames import decode_frames
from shared.instruments import tauvex as tv

VERSION = tv.MODULE_VERSIONS["CRT_LV1A"]


def level1a_header(obs: tv.Level1Observation, tele: int) -> fits.Header:
    """Keywords every TAUVEX product of this observation and telescope starts with."""
    h = fits.Header()
    h["TELESCOP"] = (tv.TELESCOP, "mission")
    h["TELE_NUM"] = (tele, "telescope T1..T3")
    h["FILTER"] = (tv.TELESCOPES[tele].filter.name, "filter of this telescope")
    h["OBS_ID"] = (obs.obs_id, "observation id (START LOG payload)")
    h["STARTOBS"] = (tv.clock_to_isot(obs.start_ms), "UTC start of observation")
    h["ENDOBS"] = (tv.clock_to_isot(obs.end_ms), "UTC end of observation")
    h["CLKSTART"] = (obs.start_ms, "[ms] spacecraft clock at start")
    h["CLKEND"] = (obs.end_ms, "[ms] spacecraft clock at end")
    h["NFRAMES"] = (obs.nframes, "Level 1 data major frames")
    return h


def make_level1a(
    obs: tv.Level1Observation, *, charge_window: tuple[int, int] = tv.CHARGE_WINDOW
) -> dict[int, fits.HDUList]:
    """Decode a Level 1 observation into Level 1a products (CRT_LV1A + VALIDATE), per telescope.

    Columns W, S, Z (int16, ADC counts), VALIDITY (int32, `ValidityBit`, 0 = valid), then
    TIME (s, spacecraft clock, ms resolution). Returns {TELE_NUM: HDUList} for T1..T3 (a
    telescope without events gets an empty table). Broken segments are counted in NBADSEG.
    """
    ev = decode_frames(obs.frames)
    valid = validate.validity(ev.w, ev.s, ev.z, charge_window=charge_window)
    time_s = ev.time_ms / 1000.0
    # Keywords shared by the three products, built once (the astropy Header and Card set-up is
    # the dominant fixed cost of a product); TELE_NUM, FILTER and NINVALID are set per telescope.
    common = level1a_header(obs, 1)
    common["NBADSEG"] = (ev.n_broken, "broken segments skipped (all telescopes)")
    common["NUNTIMED"] = (ev.n_untimed, "events before the first TIME segment")
    common["NINVALID"] = (0, "events with VALIDITY != 0")
    common["CRT_LV1A"] = (VERSION, "version of module CRT_LV1A")
    common["VALIDATE"] = (validate.VERSION, "version of module VALIDATE")
    out: dict[int, fits.HDUList] = {}
    for tele, telescope in tv.TELESCOPES.items():
        sel = np.flatnonzero(ev.tele == tele)
        v = valid[sel]
        h = common.copy()
        h["TELE_NUM"] = tele
        h["FILTER"] = telescope.filter.name
        h["NINVALID"] = int(np.count_nonzero(v))
        cols: dict[str, NDArray[Any]] = {
            "W": ev.w[sel], "S": ev.s[sel], "Z": ev.z[sel], "VALIDITY": v, "TIME": time_s[sel]}
        out[tele] = tv.event_table("1a", cols, h)
    return out
