"""TAUVEX CRT_LV1A module: a Level 1 observation -> one Level 1a event table per telescope."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

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
    out: dict[int, fits.HDUList] = {}
    for tele in tv.TELESCOPES:
        sel = ev.tele == tele
        h = level1a_header(obs, tele)
        h["NBADSEG"] = (ev.n_broken, "broken segments skipped (all telescopes)")
        h["NUNTIMED"] = (ev.n_untimed, "events before the first TIME segment")
        h["NINVALID"] = (int(np.count_nonzero(valid[sel])), "events with VALIDITY != 0")
        h["CRT_LV1A"] = (VERSION, "version of module CRT_LV1A")
        h["VALIDATE"] = (validate.VERSION, "version of module VALIDATE")
        cols = {"W": ev.w[sel], "S": ev.s[sel], "Z": ev.z[sel], "VALIDITY": valid[sel],
                "TIME": ev.time_ms[sel] / 1000.0}
        out[tele] = tv.event_table("1a", cols, h)
    return out
