"""TAUVEX simulator: drift scans of a UV point-source sky by T1-T3, encoded as Level 0 telemetry.

Seeded and deterministic. Produces the Level 0 byte stream (sync word, 24 x 40-bit segments,
filler), the spacecraft housekeeping/attitude table (FITS BINTABLE bytes), and the truth: the
events before encoding, the source table and the true attitude. The format comes from
`shared.instruments.tauvex`, the same module the decoder uses.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

from shared.instruments import tauvex as tv

ARCSEC_PER_DEG = 3600.0


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Parameters of a simulated TAUVEX drift scan (defaults: a small scan, ~1e5 events)."""

    seed: int = 1
    duration_s: float = 40.0  #: length of each observation (a 53-min block, scaled down)
    n_observations: int = 1
    gap_s: float = 1.0  #: clock gap between observations
    ra0_deg: float = 150.0  #: spacecraft pointing at the start of the first observation
    dec0_deg: float = -30.0
    scan_rate_arcsec_s: float = 15.0  #: drift rate along RA (Earth rotation for a GEO platform)
    roll_deg: float = 0.0
    n_sources: int = 45
    rate_range_cps: tuple[float, float] = (1.0, 150.0)  #: T1 count rate, log-uniform
    faint_in_one_filter_frac: float = 0.15  #: sources ~50x fainter in one random filter
    background_cps: float = 200.0  #: per telescope, whole field
    invalid_frac: float = 0.03  #: non-photon events (charge outside the validity window)
    charge_mean: float = 3000.0  #: mean total charge W+S+Z (ADC counts)
    charge_sigma: float = 450.0
    charge_noise: float = 1.3  #: electronic noise per anode (ADC counts, rms)
    attitude_step_s: float = 0.1
    attitude_offset_arcsec: tuple[float, float] = (6.0, -5.0)  #: reported - true (east, north)
    attitude_wobble_arcsec: float = 3.0  #: amplitude of a slow attitude-reporting error
    attitude_wobble_period_s: float = 25.0
    leading_filler_frames: int = 200
    start_clock_ms: int = 500_000_000
    grid_step_s: float = 0.05  #: time step of the photon generator (exact times are uniform)


@dataclass(slots=True)
class TauvexSimulation:
    """Everything the simulator produced: telemetry, attitude and truth."""

    config: ScanConfig
    level0: bytes  #: Level 0 downlink (major frames of 128 bytes)
    attitude: bytes  #: spacecraft housekeeping + attitude as a FITS file (bytes)
    #: truth events in the order they were encoded: obs_id, tele, time_ms, w, s, z, valid,
    #: source_id (-1 background/invalid), x_focal_px, y_focal_px (ideal focal plane, after
    #: optics), ra_deg, dec_deg (where the photon came from on the sky after optics)
    events: dict[str, NDArray]
    sources: Table  #: source_id, ra_deg, dec_deg, rate_cps_t{k}, flux_ujy_t{k}, exp_counts_t{k}
    attitude_truth: Table  #: time_s, ra_t{k}, dec_t{k}, roll_t{k} (true boresights)
    observations: list[tuple[int, int, int]] = field(default_factory=list)  #: id, start, end ms


def _offset(
    ra_deg: NDArray[np.float64],
    dec_deg: NDArray[np.float64],
    east_arcsec: NDArray[np.float64] | float,
    north_arcsec: NDArray[np.float64] | float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Move a position by small east/north offsets (arcsec)."""
    dec = dec_deg + np.asarray(north_arcsec) / ARCSEC_PER_DEG
    ra = ra_deg + np.asarray(east_arcsec) / ARCSEC_PER_DEG / np.cos(np.radians(dec))
    return ra, dec


def _pointing(cfg: ScanConfig, t_s: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """True spacecraft pointing (deg) at time t (s since the first observation's start)."""
    ra = cfg.ra0_deg + cfg.scan_rate_arcsec_s * t_s / ARCSEC_PER_DEG / np.cos(
        np.radians(cfg.dec0_deg)
    )
    return ra, np.full_like(ra, cfg.dec0_deg)


def _boresight(cfg: ScanConfig, tele: int, t_s: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    ra, dec = _pointing(cfg, t_s)
    east, north = tv.TELESCOPES[tele].boresight_offset_arcsec
    return _offset(ra, dec, east, north)


def _attitude_error(cfg: ScanConfig, t_s: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """Reported minus true boresight (arcsec east, north): constant + slow wobble."""
    phase = 2.0 * np.pi * t_s / cfg.attitude_wobble_period_s
    east = cfg.attitude_offset_arcsec[0] + cfg.attitude_wobble_arcsec * np.sin(phase)
    north = cfg.attitude_offset_arcsec[1] + cfg.attitude_wobble_arcsec * np.cos(0.7 * phase)
    return east, north


def _make_sources(cfg: ScanConfig, rng: np.random.Generator) -> Table:
    total_s = cfg.n_observations * cfg.duration_s + (cfg.n_observations - 1) * cfg.gap_s
    radius_arcsec = tv.FIELD_DIAMETER_DEG / 2 * ARCSEC_PER_DEG
    scan_len_arcsec = cfg.scan_rate_arcsec_s * total_s
    # Uniform in the strip the field sweeps (tangent-plane arcsec about the start pointing).
    east = rng.uniform(-radius_arcsec * 0.95, scan_len_arcsec + radius_arcsec * 0.95, cfg.n_sources)
    north = rng.uniform(-radius_arcsec * 0.95, radius_arcsec * 0.95, cfg.n_sources)
    ra, dec = _offset(
        np.full(cfg.n_sources, cfg.ra0_deg), np.full(cfg.n_sources, cfg.dec0_deg), east, north
    )
    lo, hi = np.log(cfg.rate_range_cps[0]), np.log(cfg.rate_range_cps[1])
    rate1 = np.exp(rng.uniform(lo, hi, cfg.n_sources))
    colours = rng.uniform(0.6, 1.4, (3, cfg.n_sources))
    colours[0] = 1.0
    faint = rng.random(cfg.n_sources) < cfg.faint_in_one_filter_frac
    which = rng.integers(0, 3, cfg.n_sources)
    colours[which[faint], np.nonzero(faint)[0]] = 0.01
    tab = Table()
    tab["source_id"] = np.arange(cfg.n_sources, dtype=np.int32)
    tab["ra_deg"] = ra
    tab["dec_deg"] = dec
    for k in (1, 2, 3):
        rate = rate1 * colours[k - 1]
        tab[f"rate_cps_t{k}"] = rate
        tab[f"flux_ujy_t{k}"] = rate * tv.TELESCOPES[k].filter.ujy_per_cps
    return tab


def _charges(
    rng: np.random.Generator, cfg: ScanConfig, x_det: NDArray, y_det: NDArray, q_total: NDArray
) -> tuple[NDArray, NDArray, NDArray]:
    """Wedge-strip-zigzag charge division with electronic noise, 12-bit ADC."""
    fw = tv.WSZ_OFFSET + tv.WSZ_SLOPE * x_det / tv.DETECTOR_NPIX
    fs = tv.WSZ_OFFSET + tv.WSZ_SLOPE * y_det / tv.DETECTOR_NPIX
    fz = 1.0 - fw - fs
    n = x_det.size
    out = []
    for frac in (fw, fs, fz):
        q = q_total * frac + rng.normal(0.0, cfg.charge_noise, n)
        out.append(np.clip(np.rint(q), 0, tv.CHARGE_MAX).astype(np.int16))
    return out[0], out[1], out[2]


def _simulate_observation(
    cfg: ScanConfig,
    rng: np.random.Generator,
    sources: Table,
    t0_s: float,
    t1_s: float,
    exp_counts: dict[int, NDArray],
) -> dict[str, NDArray]:
    """Photon and non-photon events of all three telescopes for one observation."""
    grid = np.arange(t0_s, t1_s, cfg.grid_step_s)
    dt = cfg.grid_step_s
    sigma_opt_px = tv.OPTICS_FWHM_ARCSEC / 2.3548 / tv.PLATE_SCALE_ARCSEC
    chunks: list[dict[str, NDArray]] = []
    for tele in (1, 2, 3):
        # Sources: expected photons per (source, grid step) while inside the field circle.
        bra, bdec = _boresight(cfg, tele, grid)
        fx, fy = tv.sky_to_focal(
            np.asarray(sources["ra_deg"])[:, None],
            np.asarray(sources["dec_deg"])[:, None],
            bra[None, :],
            bdec[None, :],
            cfg.roll_deg,
        )
        r = np.hypot(fx - tv.DETECTOR_CENTER_PX, fy - tv.DETECTOR_CENTER_PX)
        inside = r < tv.FIELD_RADIUS_PX
        rate = np.asarray(sources[f"rate_cps_t{tele}"])[:, None]
        dxd, dyd = tv.distortion(fx, fy)
        exp_counts[tele] += np.sum(rate * dt * inside * tv.flat_field(dxd, dyd), axis=1)
        lam = rate * dt * (r < tv.FIELD_RADIUS_PX + 5 * sigma_opt_px)
        n = rng.poisson(lam)
        src_idx, t_idx = np.nonzero(n)
        reps = n[src_idx, t_idx]
        src = np.repeat(src_idx, reps)
        t = np.repeat(grid[t_idx], reps) + rng.uniform(0.0, dt, src.size)
        bra_e, bdec_e = _boresight(cfg, tele, t)
        x, y = tv.sky_to_focal(
            np.asarray(sources["ra_deg"])[src],
            np.asarray(sources["dec_deg"])[src],
            bra_e,
            bdec_e,
            cfg.roll_deg,
        )
        x = x + rng.normal(0.0, sigma_opt_px, x.size)
        y = y + rng.normal(0.0, sigma_opt_px, y.size)
        # Background photons: uniform over the field circle.
        n_bg = rng.poisson(cfg.background_cps * (t1_s - t0_s))
        rr = tv.FIELD_RADIUS_PX * np.sqrt(rng.random(n_bg))
        phi = rng.uniform(0.0, 2 * np.pi, n_bg)
        x = np.concatenate([x, tv.DETECTOR_CENTER_PX + rr * np.cos(phi)])
        y = np.concatenate([y, tv.DETECTOR_CENTER_PX + rr * np.sin(phi)])
        t = np.concatenate([t, rng.uniform(t0_s, t1_s, n_bg)])
        src = np.concatenate([src, np.full(n_bg, -1)])
        keep = np.hypot(x - tv.DETECTOR_CENTER_PX, y - tv.DETECTOR_CENTER_PX) < tv.FIELD_RADIUS_PX
        xd, yd = tv.distortion(x, y)
        keep &= rng.random(x.size) < tv.flat_field(xd, yd)
        x, y, xd, yd, t, src = x[keep], y[keep], xd[keep], yd[keep], t[keep], src[keep]
        q = np.clip(rng.normal(cfg.charge_mean, cfg.charge_sigma, x.size), 1500.0, 5800.0)
        valid = np.ones(x.size, dtype=bool)
        # Non-photon events: charge outside the validity window, anywhere on the detector.
        n_bad = rng.poisson(cfg.invalid_frac * x.size)
        rr = tv.FIELD_RADIUS_PX * np.sqrt(rng.random(n_bad))
        phi = rng.uniform(0.0, 2 * np.pi, n_bad)
        xb = tv.DETECTOR_CENTER_PX + rr * np.cos(phi)
        yb = tv.DETECTOR_CENTER_PX + rr * np.sin(phi)
        low = rng.random(n_bad) < 0.5
        qb = np.where(low, rng.uniform(200.0, 1000.0, n_bad), rng.uniform(8000.0, 14000.0, n_bad))
        x, y = np.concatenate([x, xb]), np.concatenate([y, yb])
        xd, yd = np.concatenate([xd, xb]), np.concatenate([yd, yb])
        t = np.concatenate([t, rng.uniform(t0_s, t1_s, n_bad)])
        src = np.concatenate([src, np.full(n_bad, -1)])
        q = np.concatenate([q, qb])
        valid = np.concatenate([valid, np.zeros(n_bad, dtype=bool)])
        w, s, z = _charges(rng, cfg, xd, yd, q)
        bra_e, bdec_e = _boresight(cfg, tele, t)
        ra, dec = tv.focal_to_sky(x, y, bra_e, bdec_e, cfg.roll_deg)
        chunks.append(
            {
                "tele": np.full(x.size, tele, dtype=np.int8),
                "time_ms": cfg.start_clock_ms + np.floor(t * 1000.0).astype(np.int64),
                "w": w,
                "s": s,
                "z": z,
                "valid": valid,
                "source_id": src.astype(np.int32),
                "x_focal_px": x,
                "y_focal_px": y,
                "ra_deg": ra,
                "dec_deg": dec,
            }
        )
    ev = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.argsort(ev["time_ms"], kind="stable")
    return {k: v[order] for k, v in ev.items()}


def _encode_observation(obs_id: int, ev: dict[str, NDArray]) -> NDArray[np.uint8]:
    """Events of one observation -> data major frames (START LOG, TIME/EVENT, END LOG, pad)."""
    ms = ev["time_ms"]
    new_ms = np.ones(ms.size, dtype=bool)
    new_ms[1:] = ms[1:] != ms[:-1]
    n_time = int(new_ms.sum())
    n_body = ms.size + n_time
    body = np.empty(n_body, dtype=np.uint64)
    # Each event is preceded by a TIME segment whenever the millisecond counter changed.
    ev_pos = np.arange(ms.size) + np.cumsum(new_ms)
    body[ev_pos] = tv.event_segment(ev["tele"], ev["w"], ev["s"], ev["z"])
    body[ev_pos[new_ms] - 1] = tv.time_segment(ms[new_ms])
    seg = np.concatenate(
        [
            np.array([tv.log_segment(tv.LogCode.START, obs_id)], dtype=np.uint64),
            body,
            np.array([tv.log_segment(tv.LogCode.END, obs_id)], dtype=np.uint64),
        ]
    )
    pad = (-seg.size) % tv.SEGMENTS_PER_FRAME
    seg = np.concatenate([seg, np.full(pad, tv.FILLER_SEGMENT, dtype=np.uint64)])
    return tv.frames_from_segments(seg.reshape(-1, tv.SEGMENTS_PER_FRAME))


def attitude_fits_bytes(table: Table) -> bytes:
    """Spacecraft housekeeping/attitude table -> FITS bytes (empty primary + ATTITUDE)."""
    hdu = fits.BinTableHDU(table, name="ATTITUDE")
    hdu.header["TELESCOP"] = (tv.TELESCOP, "mission")
    hdu.header["TIMEUNIT"] = ("s", "TIME is the spacecraft clock in seconds")
    buf = io.BytesIO()
    # No checksum: its comment carries a time stamp and the bytes must be deterministic.
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    return buf.getvalue()


def simulate_scan(config: ScanConfig | None = None) -> TauvexSimulation:
    """Simulate `config.n_observations` TAUVEX drift-scan observations and their telemetry."""
    cfg = config or ScanConfig()
    rng = np.random.default_rng(cfg.seed)
    sources = _make_sources(cfg, rng)
    exp_counts = {k: np.zeros(len(sources)) for k in (1, 2, 3)}
    frames: list[NDArray[np.uint8]] = []
    events: list[dict[str, NDArray]] = []
    observations: list[tuple[int, int, int]] = []
    for k in range(cfg.n_observations):
        obs_id = k + 1
        t0 = k * (cfg.duration_s + cfg.gap_s)
        t1 = t0 + cfg.duration_s
        ev = _simulate_observation(cfg, rng, sources, t0, t1, exp_counts)
        ev["obs_id"] = np.full(ev["tele"].size, obs_id, dtype=np.int32)
        events.append(ev)
        data = _encode_observation(obs_id, ev)
        # Constant 1 Mb/s: the observation's frame slots are data or filler, data spread evenly.
        n_slots = max(int(np.ceil(cfg.duration_s * tv.FRAMES_PER_S)), data.shape[0])
        slots = np.broadcast_to(tv.FILLER_FRAME, (n_slots, tv.FRAME_BYTES)).copy()
        slots[np.linspace(0, n_slots - 1, data.shape[0]).astype(np.int64)] = data
        frames.append(np.broadcast_to(tv.FILLER_FRAME, (cfg.leading_filler_frames, 128)))
        frames.append(slots)
        observations.append(
            (obs_id, int(cfg.start_clock_ms + t0 * 1000), int(cfg.start_clock_ms + t1 * 1000))
        )
    frames.append(np.broadcast_to(tv.FILLER_FRAME, (10, tv.FRAME_BYTES)))
    level0 = np.ascontiguousarray(np.concatenate(frames)).tobytes()

    total_s = cfg.n_observations * cfg.duration_s + (cfg.n_observations - 1) * cfg.gap_s
    t_att = np.arange(-1.0, total_s + 1.0 + 1e-9, cfg.attitude_step_s)
    truth = Table()
    reported = Table()
    clock_s = cfg.start_clock_ms / 1000.0 + t_att
    truth["time_s"] = clock_s
    reported["TIME"] = clock_s
    err_e, err_n = _attitude_error(cfg, t_att)
    for tele in (1, 2, 3):
        ra, dec = _boresight(cfg, tele, t_att)
        truth[f"ra_t{tele}"], truth[f"dec_t{tele}"] = ra, dec
        truth[f"roll_t{tele}"] = np.full(t_att.size, cfg.roll_deg)
        rra, rdec = _offset(ra, dec, err_e, err_n)
        reported[f"RA_T{tele}"], reported[f"DEC_T{tele}"] = rra, rdec
        reported[f"ROLL_T{tele}"] = np.full(t_att.size, cfg.roll_deg)
    for tele in (1, 2, 3):
        reported[f"HV_T{tele}"] = (2400.0 + rng.normal(0, 0.5, t_att.size)).astype(np.float32)
    reported["DET_TEMP_C"] = (18.0 + 0.01 * t_att).astype(np.float32)
    for name in reported.colnames:
        unit = {"TIME": "s", "DET_TEMP_C": "deg_C"}.get(name)
        if name.startswith(("RA_", "DEC_", "ROLL_")):
            unit = "deg"
        elif name.startswith("HV_"):
            unit = "V"
        reported[name].unit = unit
    for k in (1, 2, 3):
        sources[f"exp_counts_t{k}"] = exp_counts[k]
    all_events = {k: np.concatenate([e[k] for e in events]) for k in events[0]}
    return TauvexSimulation(
        config=cfg,
        level0=level0,
        attitude=attitude_fits_bytes(reported),
        events=all_events,
        sources=sources,
        attitude_truth=truth,
        observations=observations,
    )


def reference_catalogue(
    sim: TauvexSimulation,
    *,
    min_rate_cps: float = 20.0,
    pos_err_arcsec: float = 0.2,
    seed: int = 0,
) -> fits.HDUList:
    """An external astrometric reference catalogue of the scanned field (as a mission would take
    from a star catalogue): the brighter sources with positions known to `pos_err_arcsec` (rms
    per axis). A calibration file: header CALTYPE='REFCAT', INSTRUME='TAUVEX'; columns RA, DEC
    (deg), POS_ERR (arcsec)."""
    rng = np.random.default_rng(seed)
    src = sim.sources[np.asarray(sim.sources["rate_cps_t1"]) >= min_rate_cps]
    n = len(src)
    dec = np.asarray(src["dec_deg"]) + rng.normal(0.0, pos_err_arcsec, n) / 3600.0
    ra = np.asarray(src["ra_deg"]) + rng.normal(0.0, pos_err_arcsec, n) / 3600.0 / np.cos(
        np.radians(dec)
    )
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("RA", "D", unit="deg", array=ra),
            fits.Column("DEC", "D", unit="deg", array=dec),
            fits.Column("POS_ERR", "E", unit="arcsec", array=np.full(n, pos_err_arcsec)),
        ],
        name="REFCAT",
    )
    primary = fits.PrimaryHDU()
    for h in (primary.header, table.header):
        h["TELESCOP"] = (tv.TELESCOP, "mission")
        h["INSTRUME"] = (tv.TELESCOP, "instrument")
        h["CALTYPE"] = ("REFCAT", "astrometric reference catalogue for REGISTER")
        h["CHNLNUM"] = (0, "all telescopes")
        h["FILENAME"] = ("tauvex_refcat.fits", "file name")
    return fits.HDUList([primary, table])
