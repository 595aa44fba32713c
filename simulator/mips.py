"""Seeded Spitzer MIPS AOR simulator: pointing, detector forward model, raw DCEs and telemetry.

`simulate_aor(cfg)` observes a synthetic sky (`simulator.sky`) with the 24 um Si:As array
(on-board slope + first difference) and the Ge arrays (whole ramps, stim flashes, drifting
responsivity) and returns the CCSDS telemetry of the AOR, the raw DCEs that decode must
reproduce bit for bit, "measured" calibration files and the truth. The forward model is the
one documented in docs/mips-telemetry.md; calibrate inverts exactly it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from services.decode.mips import telemetry as tlm
from shared.instruments import mips
from simulator import sky as skymod

#: Golden angle: successive dither offsets on a sunflower spiral cover sub-pixel phases evenly.
_GOLDEN_ANGLE_RAD = math.pi * (3.0 - math.sqrt(5.0))


@dataclass(frozen=True, slots=True)
class MipsAORConfig:
    """Everything that defines one simulated MIPS AOR (angles in deg, offsets in arcsec).

    Raster offsets are (x, y) in arcsec along the array's pixel axes from the field centre
    and place the centre of each channel's *usable* area (for 70 um the good half, rows
    0..15); dithers are added on a sunflower spiral of `dither_*_arcsec * sqrt(k)`.
    """

    aorkey: int = 27182818
    mode: str = "photometry"  #: "photometry" (MIPSPHOT) or "scan" (MIPSSCAN)
    channels: tuple[int, ...] = (1, 2)
    ra_deg: float = 150.119
    dec_deg: float = 2.206
    pa_deg: float = 32.0
    # --- sky: sources over 18.7'x18.7' (the rotated raster's ~14'x14' lies inside), sparse
    # enough that 70 um (FWHM 18") is not confused by the faint 24 um population: the 70 um
    # accuracy is measured on the default AOR itself
    n_sources: int = 390
    flux_24_min_ujy: float = 150.0
    flux_24_max_ujy: float = 20000.0
    count_slope: float = 0.4  #: 24 um counts N(>S) ~ S**-count_slope
    sky_half_arcsec: float = 560.0  #: sources are drawn within +-this of the centre
    seed: int = 20240601
    # --- timing
    start_mjd: float = 53500.25
    exptime_24_s: float = 10.0  #: rounded to whole 0.524288 s samples
    exptime_70_s: float = 10.0
    exptime_160_s: float = 10.0  #: two ramps of half this
    dce_overhead_s: float = 0.5  #: dead time between DCEs
    # --- photometry geometry: a 3x3 raster at 24 um and 3x6 at 70 um (the good half is 320"
    # x 160"), both covering ~14'x14' with overlaps of >= 30" between raster positions
    raster_24: tuple[tuple[float, float], ...] = tuple(
        (x, y) for y in (-250.0, 0.0, 250.0) for x in (-250.0, 0.0, 250.0)
    )
    n_dither_24: int = 8
    dither_24_arcsec: float = 7.0
    raster_70: tuple[tuple[float, float], ...] = tuple(
        (x, y) for y in (-325.0, -195.0, -65.0, 65.0, 195.0, 325.0) for x in (-260.0, 0.0, 260.0)
    )
    n_dither_70: int = 6
    dither_70_arcsec: float = 9.0
    raster_160: tuple[tuple[float, float], ...] = tuple(
        (x, y) for y in (-150.0, -75.0, 0.0, 75.0, 150.0) for x in (-120.0, 0.0, 120.0)
    )
    n_dither_160: int = 2
    dither_160_arcsec: float = 12.0
    # --- scan geometry (legs along the array +y axis, stepped in x)
    scan_legs: int = 3
    scan_leg_length_arcsec: float = 480.0
    scan_leg_step_arcsec: float = 150.0
    scan_dce_step_arcsec: float = 36.0
    # --- detector: 24 um Si:As
    first_dce_depression: float = 0.12  #: DCENUM 0 response is (1 - this)
    early_dce_depression: float = 0.02  #: DCENUM 1, 2 response is (1 - this)
    read_noise_24_dn: float = 5.0
    gain_24_e_per_dn: float = 5.0
    dark_24_dn_s: float = 2.0
    satlevel_24_dn: int = 14000
    cr_rate_24_per_pixel_s: float = 2.0e-4
    # --- detector: Ge:Ga
    read_noise_ge_dn: float = 3.0
    gain_ge_e_per_dn: float = 2.0
    dark_ge_dn_s: float = 20.0
    satlevel_ge_dn: int = 65535
    ge_reset_level_dn: float = 2000.0
    responsivity_70_dn_s_per_iu: float = 2.0e4
    responsivity_160_dn_s_per_iu: float = 2.0e3
    responsivity_drift_amplitude: float = 0.1
    responsivity_drift_period_s: float = 1500.0
    stim_period_s: float = 120.0
    stim_level_70_iu: float = 0.05
    stim_level_160_iu: float = 0.5
    cr_rate_ge_per_pixel_s: float = 1.0 / 35.0
    bad_half_response: float = 0.3  #: 70 um rows 16..31 respond this much, with 4x read noise
    # --- both
    flat_rms: float = 0.02
    bad_pixel_fraction: float = 0.005  #: half dead, half hot
    hot_pixel_dark_dn_s: float = 200.0
    flat_calibration_error: float = 0.003  #: the "measured" flat is known to this (rms)
    dark_calibration_error_dn_s: float = 0.02
    segment_bytes: int = tlm.DEFAULT_SEGMENT_BYTES
    # --- optics: "gaussian" (the band's FWHM) or "airy" (the diffraction pattern of the 85 cm
    # mirror at the band's wavelength, with this central obscuration: rings and all)
    psf: str = "gaussian"
    airy_obscuration: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in ("photometry", "scan"):
            raise ValueError(f"mode must be 'photometry' or 'scan', got {self.mode!r}")
        if not self.channels or not set(self.channels) <= {1, 2, 3}:
            raise ValueError(f"channels must be a subset of (1, 2, 3), got {self.channels}")
        if self.psf not in ("gaussian", "airy"):
            raise ValueError(f"psf must be 'gaussian' or 'airy', got {self.psf!r}")

    @classmethod
    def small(cls, **overrides: object) -> MipsAORConfig:
        """A fast AOR for tests: one raster position, 6 science DCEs per channel, 3 s DCEs,
        stims every 15 s, 40 sources in a 3'x3' field."""
        base = cls(
            aorkey=11235813,
            n_sources=40,
            sky_half_arcsec=110.0,
            raster_24=((0.0, 0.0),),
            n_dither_24=6,
            exptime_24_s=3.0,
            raster_70=((0.0, 0.0),),
            n_dither_70=6,
            exptime_70_s=3.0,
            raster_160=((0.0, 0.0),),
            n_dither_160=2,
            stim_period_s=15.0,
        )
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def scan_map(cls, **overrides: object) -> MipsAORConfig:
        """A small scan map: 3 legs of 8' along the array y axis."""
        base = cls(aorkey=31415926, mode="scan", n_sources=150, sky_half_arcsec=300.0)
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]

    @property
    def aot_type(self) -> str:
        return "MIPSPHOT" if self.mode == "photometry" else "MIPSSCAN"

    @property
    def render_airy_obscuration(self) -> float | None:
        """`sky.render`'s airy_obscuration for this AOR's optics (None: the Gaussian)."""
        return self.airy_obscuration if self.psf == "airy" else None


@dataclass(frozen=True, slots=True)
class _Detector:
    """True per-pixel properties of one array (what the calibration files measure)."""

    dark_dn_s: np.ndarray
    flat: np.ndarray
    pmask: np.ndarray
    dead: np.ndarray
    read_noise_dn: np.ndarray
    response: np.ndarray  #: extra response factor (70 um bad half)


@dataclass
class SimulatedAOR:
    """The products of `simulate_aor`: telemetry, the raw DCEs it decodes to, calibration,
    and the truth (sources, pointing, noiseless images via `truth_bcd`)."""

    config: MipsAORConfig
    telemetry: bytes
    raw_dces: list[fits.HDUList]
    calibration: list[fits.HDUList]
    truth_sources: Table
    truth_pointing: Table
    sky: skymod.Sky
    _cache: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def truth_wcs(self, channel: int, expid: int, dcenum: int) -> WCS:
        """The true TAN-SIP WCS of one DCE."""
        row = self._row(channel, expid, dcenum)
        kw = mips.wcs_keywords(
            channel, ra_deg=float(row["ra"]), dec_deg=float(row["dec"]), pa_deg=float(row["pa"])
        )
        return WCS(fits.Header(kw), relax=True)

    def truth_bcd(self, channel: int, expid: int, dcenum: int) -> np.ndarray:
        """Noiseless sky of one DCE in MJy/sr (what a perfect calibration recovers)."""
        key = (channel, expid, dcenum)
        if key not in self._cache:
            band = mips.BANDS[channel]
            self._cache[key] = skymod.render(
                self.sky, channel, self.truth_wcs(*key), (band.nrows, band.ncols),
                airy_obscuration=self.config.render_airy_obscuration,
            )
        return self._cache[key]

    def _row(self, channel: int, expid: int, dcenum: int) -> Table.Row:
        t = self.truth_pointing
        idx = np.flatnonzero(
            (t["channel"] == channel) & (t["expid"] == expid) & (t["dcenum"] == dcenum)
        )
        if idx.size != 1:
            raise KeyError(f"no DCE channel={channel} expid={expid} dcenum={dcenum} in this AOR")
        return t[int(idx[0])]


# --- pointing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Dce:
    channel: int
    expid: int
    dcenum: int
    xoff_arcsec: float  #: array-axis offset of the usable-area centre from the field centre
    yoff_arcsec: float
    is_stim: bool
    t_start_s: float = 0.0  #: since AOR start


def _dither(n: int, scale_arcsec: float) -> np.ndarray:
    k = np.arange(n)
    r = scale_arcsec * np.sqrt(k)
    return np.stack([r * np.cos(k * _GOLDEN_ANGLE_RAD), r * np.sin(k * _GOLDEN_ANGLE_RAD)], axis=1)


def _science_offsets(cfg: MipsAORConfig, channel: int) -> list[tuple[int, float, float]]:
    """(expid, x, y) of each science DCE of a channel, in time order."""
    out: list[tuple[int, float, float]] = []
    if cfg.mode == "photometry":
        raster, ndith, scale = {
            1: (cfg.raster_24, cfg.n_dither_24, cfg.dither_24_arcsec),
            2: (cfg.raster_70, cfg.n_dither_70, cfg.dither_70_arcsec),
            3: (cfg.raster_160, cfg.n_dither_160, cfg.dither_160_arcsec),
        }[channel]
        d = _dither(ndith, scale)
        for expid, (rx, ry) in enumerate(raster):
            out.extend((expid, rx + dx, ry + dy) for dx, dy in d)
    else:
        nstep = int(cfg.scan_leg_length_arcsec // cfg.scan_dce_step_arcsec) + 1
        ys = (np.arange(nstep) - (nstep - 1) / 2.0) * cfg.scan_dce_step_arcsec
        for leg in range(cfg.scan_legs):
            x = (leg - (cfg.scan_legs - 1) / 2.0) * cfg.scan_leg_step_arcsec
            # Alternate legs scan in opposite directions, as the telescope does.
            out.extend((leg, x, float(y)) for y in (ys if leg % 2 == 0 else ys[::-1]))
    return out


def _exptime_s(cfg: MipsAORConfig, channel: int) -> tuple[float, int, int]:
    """(EXPTIME s, NSAMPLES, NRAMPS) of a channel's DCEs."""
    if channel == 1:
        n = max(3, round(cfg.exptime_24_s / mips.SI_SAMPLE_S))
        return n * mips.SI_SAMPLE_S, n, 1
    exptime = cfg.exptime_70_s if channel == 2 else cfg.exptime_160_s
    n = max(4, round(exptime * mips.GE_SAMPLE_RATE_HZ))
    nramps = 2 if channel == 3 else 1
    n -= n % nramps
    return n / mips.GE_SAMPLE_RATE_HZ, n, nramps


def _schedule(cfg: MipsAORConfig, channel: int) -> list[_Dce]:
    """The channel's DCEs in time order, stim flashes inserted for Ge every `stim_period_s`
    (first after the first science DCE, one more at the end); a stim DCE keeps the pointing
    of the DCE before it and takes the next DCENUM of that exposure."""
    exptime, _, _ = _exptime_s(cfg, channel)
    step = exptime + cfg.dce_overhead_s
    science = _science_offsets(cfg, channel)
    dces: list[_Dce] = []
    dcenum: dict[int, int] = {}
    last_stim = -math.inf
    t = 0.0

    def add(expid: int, x: float, y: float, stim: bool) -> None:
        nonlocal t
        n = dcenum.get(expid, 0)
        dcenum[expid] = n + 1
        dces.append(_Dce(channel, expid, n, x, y, stim, t))
        t += step

    for i, (expid, x, y) in enumerate(science):
        add(expid, x, y, False)
        if channel != 1 and (t - last_stim >= cfg.stim_period_s or i == len(science) - 1):
            last_stim = t
            add(expid, x, y, True)
    return dces


def _boresight(cfg: MipsAORConfig, d: _Dce) -> tuple[float, float]:
    """Commanded array-centre (ra, dec) of a DCE."""
    band = mips.BANDS[d.channel]
    x, y = d.xoff_arcsec, d.yoff_arcsec
    if d.channel == 2:
        # The usable half (rows 0..15) is centred 8 rows below the array centre: move the
        # array centre up by as much so that the good half lands on the requested offset.
        y += (band.nrows / 4.0) * band.pixel_arcsec
    pa = math.radians(cfg.pa_deg)
    # Pixel +x -> (xi, eta) = (-cos pa, sin pa); pixel +y -> (sin pa, cos pa) (wcs_keywords).
    xi = -x * math.cos(pa) + y * math.sin(pa)
    eta = x * math.sin(pa) + y * math.cos(pa)
    ra, dec = skymod.tangent_to_sky(np.array([xi]), np.array([eta]), cfg.ra_deg, cfg.dec_deg)
    return float(ra[0]), float(dec[0])


def pointing_plan(cfg: MipsAORConfig) -> Table:
    """The AOR's DCEs in telemetry (time) order without simulating them: channel, expid,
    dcenum, commanded array-centre ra/dec/pa (deg), t_start_s (since AOR start), is_stim."""
    schedule = [d for ch in sorted(cfg.channels) for d in _schedule(cfg, ch)]
    schedule.sort(key=lambda d: (d.t_start_s, d.channel))
    rows = []
    for d in schedule:
        ra, dec = _boresight(cfg, d)
        rows.append((d.channel, d.expid, d.dcenum, ra, dec, cfg.pa_deg, d.t_start_s, d.is_stim))
    names = ("channel", "expid", "dcenum", "ra", "dec", "pa", "t_start_s", "is_stim")
    return Table(rows=rows, names=names) if rows else Table(names=names)


# --- detectors ----------------------------------------------------------------------------


def _make_detector(cfg: MipsAORConfig, channel: int, rng: np.random.Generator) -> _Detector:
    band = mips.BANDS[channel]
    shape = (band.nrows, band.ncols)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    # A gentle illumination gradient (2 % across the array) on top of pixel-to-pixel rms.
    flat = (1.0 + 0.02 * (xx / shape[1] - 0.5)) * (1.0 + cfg.flat_rms * rng.standard_normal(shape))
    nbad = rng.random(shape) < cfg.bad_pixel_fraction
    dead = nbad & (rng.random(shape) < 0.5)
    hot = nbad & ~dead
    ge = channel != 1
    dark = np.full(shape, cfg.dark_ge_dn_s if ge else cfg.dark_24_dn_s)
    dark *= 1.0 + 0.1 * rng.standard_normal(shape)
    dark[hot] = cfg.hot_pixel_dark_dn_s * (1.0 + rng.random(int(hot.sum())))
    dark[dead] = 0.0
    rn = np.full(shape, cfg.read_noise_ge_dn if ge else cfg.read_noise_24_dn)
    response = np.ones(shape)
    pmask = np.zeros(shape, dtype=np.int32)
    if ge:
        pmask[nbad] |= mips.GE_PMASK_BAD_PIXEL
        if channel == 2:
            bad_half = yy >= band.nrows // 2
            pmask[bad_half] |= mips.GE_PMASK_BAD_HALF
            response[bad_half] = cfg.bad_half_response
            rn[bad_half] *= 4.0
    else:
        pmask[nbad] |= int(mips.MaskBit.PMASK)
    good = pmask == 0
    flat /= np.median(flat[good])
    return _Detector(dark, flat, pmask, dead, rn, response)


def _dce_factor(cfg: MipsAORConfig, dcenum: int) -> float:
    """24 um first/second-DCE response factor f_dce."""
    if dcenum == 0:
        return 1.0 - cfg.first_dce_depression
    if dcenum in (1, 2):
        return 1.0 - cfg.early_dce_depression
    return 1.0


def _responsivity(cfg: MipsAORConfig, channel: int, t_s: float, phase: float) -> float:
    """Ge responsivity R(t), DN/s per instrument unit, t seconds since AOR start."""
    r0 = cfg.responsivity_70_dn_s_per_iu if channel == 2 else cfg.responsivity_160_dn_s_per_iu
    w = 2.0 * math.pi / cfg.responsivity_drift_period_s
    return r0 * (1.0 + cfg.responsivity_drift_amplitude * math.sin(w * t_s + phase))


def _ramps(
    rate_dn_s: np.ndarray,
    *,
    nsamples: int,
    dt_s: float,
    nramps: int,
    gain: float,
    read_noise_dn: np.ndarray,
    offset_dn: float,
    satlevel_dn: int,
    cr_rate_per_pixel_s: float,
    cr_amp_dn: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Integer ramp samples (nsamples, ny, nx): sample k holds the charge collected up to
    (k+1)*dt within its ramp (Poisson), cosmic-ray jumps, read noise, clipped at full well."""
    shape = rate_dn_s.shape
    per_ramp = nsamples // nramps
    lam = np.broadcast_to(rate_dn_s * dt_s * gain, (nsamples, *shape))
    # Poisson electrons per sample interval; above 50 e- the Gaussian limit is drawn instead
    # (same mean and variance, 5x faster), exact Poisson below.
    electrons = lam + np.sqrt(lam) * rng.standard_normal(lam.shape)
    small = lam < 50.0
    if small.any():
        electrons[small] = rng.poisson(lam[small])
    inc = electrons / gain
    n_cr = rng.poisson(cr_rate_per_pixel_s * nsamples * dt_s * rate_dn_s.size)
    if n_cr:
        k = rng.integers(0, nsamples, n_cr)
        pix = rng.integers(0, rate_dn_s.size, n_cr)
        amp = np.exp(rng.uniform(math.log(cr_amp_dn[0]), math.log(cr_amp_dn[1]), n_cr))
        np.add.at(inc.reshape(nsamples, -1), (k, pix), amp)
    # Cumulative charge, restarted at each reset (160 um: two ramps per DCE).
    acc = np.cumsum(inc.reshape(nramps, per_ramp, *shape), axis=1).reshape(nsamples, *shape)
    samples = offset_dn + acc + read_noise_dn * rng.standard_normal((nsamples, *shape))
    return np.clip(np.rint(samples), -(2**31), satlevel_dn).astype(np.int32)


def _onboard_24(samples: np.ndarray, slpscale: int) -> np.ndarray:
    """On-board 24 um processing: least-squares slope (DN/sample, scaled) and first
    difference (DN) per pixel, as the (2, ny, nx) int32 raw cube."""
    n = samples.shape[0]
    k = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    slope = np.tensordot(k, samples.astype(np.float64), axes=(0, 0)) / float(np.sum(k * k))
    diff = samples[1] - samples[0]
    return np.stack([np.rint(slope * slpscale).astype(np.int32), diff.astype(np.int32)])


# --- the AOR ------------------------------------------------------------------------------


def simulate_aor(cfg: MipsAORConfig) -> SimulatedAOR:
    """Simulate one MIPS AOR: telemetry, raw DCEs, calibration files and truth (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    sky = skymod.make_sky(
        ra_deg=cfg.ra_deg,
        dec_deg=cfg.dec_deg,
        half_size_arcsec=cfg.sky_half_arcsec,
        n_sources=cfg.n_sources,
        flux_24_min_ujy=cfg.flux_24_min_ujy,
        flux_24_max_ujy=cfg.flux_24_max_ujy,
        seed=cfg.seed + 1,
        count_slope=cfg.count_slope,
    )
    start_sclk = (cfg.start_mjd - tlm.SCLK_EPOCH_MJD) * 86400.0
    writer = tlm.MipsTelemetryWriter(cfg.segment_bytes)
    detectors = {ch: _make_detector(cfg, ch, rng) for ch in sorted(cfg.channels)}
    phase = float(rng.uniform(0.0, 2.0 * math.pi))
    schedule = [d for ch in sorted(cfg.channels) for d in _schedule(cfg, ch)]
    # Telemetry comes down in time order, channels interleaved DCE by DCE.
    schedule.sort(key=lambda d: (d.t_start_s, d.channel))
    base_wcs = {
        ch: WCS(fits.Header(mips.wcs_keywords(ch, ra_deg=0.0, dec_deg=0.0, pa_deg=cfg.pa_deg)))
        for ch in cfg.channels
    }
    ngroup = {ch: sum(1 for d in schedule if d.channel == ch) for ch in cfg.channels}

    raw: list[fits.HDUList] = []
    packets: list[bytes] = []
    rows: list[dict[str, object]] = []
    sim = SimulatedAOR(cfg, b"", raw, [], sky.sources, Table(), sky)
    for d in schedule:
        band = mips.BANDS[d.channel]
        det = detectors[d.channel]
        ra, dec = _boresight(cfg, d)
        exptime, nsamples, nramps = _exptime_s(cfg, d.channel)
        wcs = _dce_wcs(base_wcs[d.channel], ra, dec)
        sky_mjysr = skymod.render(sky, d.channel, wcs, (band.nrows, band.ncols),
                                  airy_obscuration=cfg.render_airy_obscuration)
        sim._cache[(d.channel, d.expid, d.dcenum)] = sky_mjysr
        resp = math.nan
        f_dce = 1.0
        if d.channel == 1:
            f_dce = _dce_factor(cfg, d.dcenum)
            rate = sky_mjysr / band.fluxconv * det.flat * f_dce + det.dark_dn_s
            rate[det.dead] = 0.0
            ramp = _ramps(
                rate, nsamples=nsamples, dt_s=mips.SI_SAMPLE_S, nramps=1,
                gain=cfg.gain_24_e_per_dn, read_noise_dn=det.read_noise_dn, offset_dn=0.0,
                satlevel_dn=cfg.satlevel_24_dn, cr_rate_per_pixel_s=cfg.cr_rate_24_per_pixel_s,
                cr_amp_dn=(50.0, 5000.0), rng=rng,
            )  # fmt: skip
            cube = _onboard_24(ramp, tlm.DEFAULT_SLPSCALE)
            satlevel, slpscale = cfg.satlevel_24_dn, tlm.DEFAULT_SLPSCALE
        else:
            resp = _responsivity(cfg, d.channel, d.t_start_s + exptime / 2.0, phase)
            stim_iu = 0.0
            if d.is_stim:
                stim_iu = cfg.stim_level_70_iu if d.channel == 2 else cfg.stim_level_160_iu
            rate = (sky_mjysr / band.fluxconv + stim_iu) * resp * det.flat * det.response
            rate = rate + det.dark_dn_s
            rate[det.dead] = 0.0
            cube = _ramps(
                rate, nsamples=nsamples, dt_s=1.0 / mips.GE_SAMPLE_RATE_HZ, nramps=nramps,
                gain=cfg.gain_ge_e_per_dn, read_noise_dn=det.read_noise_dn,
                offset_dn=cfg.ge_reset_level_dn, satlevel_dn=cfg.satlevel_ge_dn,
                cr_rate_per_pixel_s=cfg.cr_rate_ge_per_pixel_s, cr_amp_dn=(20.0, 1000.0),
                rng=rng,
            )  # fmt: skip
            satlevel, slpscale = cfg.satlevel_ge_dn, 1
        sclk_ticks = round((start_sclk + d.t_start_s) * 65536.0)
        desc = tlm.DceDescriptor(
            aorkey=cfg.aorkey, expid=d.expid, dcenum=d.dcenum, channel=d.channel,
            aot_type=cfg.aot_type, stim_flash=d.is_stim, exptime_s=exptime, nsamples=nsamples,
            nplanes=cube.shape[0], nrows=band.nrows, ncols=band.ncols,
            n_dce_group=ngroup[d.channel], ra_deg=ra, dec_deg=dec, pa_deg=cfg.pa_deg,
            satlevel_dn=satlevel, slpscale=slpscale, sclk_s=sclk_ticks // 65536,
            sclk_subsec=sclk_ticks % 65536, nramps=nramps,
        )  # fmt: skip
        packets.append(writer.dce_packets(desc, cube))
        raw.append(tlm.raw_hdulist(desc, cube))
        rows.append(
            {
                "channel": d.channel, "expid": d.expid, "dcenum": d.dcenum, "ra": ra,
                "dec": dec, "pa": cfg.pa_deg, "mjd": desc.mjd, "is_stim": d.is_stim,
                "exptime": exptime, "f_dce": f_dce, "responsivity": resp,
            }
        )  # fmt: skip
    sim.telemetry = b"".join(packets)
    sim.truth_pointing = Table(rows=rows) if rows else Table()
    sim.calibration = _calibration_files(cfg, detectors, rng)
    return sim


def _dce_wcs(base: WCS, ra_deg: float, dec_deg: float) -> WCS:
    """`base` (a channel's TAN-SIP WCS at this PA) re-pointed: faster than parsing keywords."""
    w = base.deepcopy()
    w.wcs.crval = [ra_deg % 360.0, dec_deg]
    w.wcs.set()
    return w


def _cal_hdu(channel: int, caltype: str, data: np.ndarray, name: str) -> fits.HDUList:
    h = fits.Header()
    h["TELESCOP"] = mips.TELESCOP
    h["INSTRUME"] = mips.INSTRUME
    h["CHNLNUM"] = channel
    h["CALTYPE"] = caltype
    h["FILENAME"] = name
    return fits.HDUList([fits.PrimaryHDU(data=data, header=h)])


def _calibration_files(
    cfg: MipsAORConfig, detectors: dict[int, _Detector], rng: np.random.Generator
) -> list[fits.HDUList]:
    """Measured dark (DN/s), flat (median 1 over good pixels), pmask and Ge stim files."""
    out: list[fits.HDUList] = []
    for ch, det in sorted(detectors.items()):
        tag = f"mips{mips.BANDS[ch].name.removesuffix('um')}"
        dark = det.dark_dn_s + cfg.dark_calibration_error_dn_s * rng.standard_normal(det.flat.shape)
        dark[det.dead] = 0.0
        flat = det.flat * (1.0 + cfg.flat_calibration_error * rng.standard_normal(det.flat.shape))
        flat /= np.median(flat[det.pmask == 0])
        d = _cal_hdu(ch, "DARK", dark.astype(np.float32), f"{tag}_dark.fits")
        d[0].header["BUNIT"] = "DN/s"
        f = _cal_hdu(ch, "FLAT", flat.astype(np.float32), f"{tag}_flat.fits")
        f[0].header["BUNIT"] = ""
        p = _cal_hdu(ch, "PMASK", det.pmask.astype(np.int32), f"{tag}_pmask.fits")
        out += [d, f, p]
        if ch != 1:
            lvl = cfg.stim_level_70_iu if ch == 2 else cfg.stim_level_160_iu
            s = _cal_hdu(ch, "STIM", np.ones(det.flat.shape, np.float32), f"{tag}_stim.fits")
            s[0].header["STIMLVL"] = (lvl, "[instrument units] stim flash level")
            s[0].header["BUNIT"] = "instrument units (relative pattern)"
            out.append(s)
    return out


def write_aor(
    cfg: MipsAORConfig, outdir: Path | str, *, truth_dir: Path | str | None = None
) -> list[Path]:
    """Simulate an AOR and write telemetry (`mips_aor_<aorkey>.tlm`) and calibration FITS into
    `outdir`, and the truth tables (truth_sources.fits/.tbl, truth_pointing.fits) into
    `truth_dir` (default: `outdir`). Returns the paths written, inputs first."""
    out = Path(outdir)
    truth = Path(truth_dir) if truth_dir is not None else out
    for folder in (out, truth):
        folder.mkdir(parents=True, exist_ok=True)
    sim = simulate_aor(cfg)
    paths = [out / f"mips_aor_{cfg.aorkey}.tlm"]
    paths[0].write_bytes(sim.telemetry)
    for hdul in sim.calibration:
        p = out / str(hdul[0].header["FILENAME"])
        hdul.writeto(p, overwrite=True)
        paths.append(p)
    for name, table, fmt in (
        ("truth_sources.fits", sim.truth_sources, "fits"),
        ("truth_sources.tbl", sim.truth_sources, "ascii.ipac"),
        ("truth_pointing.fits", sim.truth_pointing, "fits"),
    ):
        table.write(truth / name, format=fmt, overwrite=True)
        paths.append(truth / name)
    return paths
