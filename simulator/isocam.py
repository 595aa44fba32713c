"""ISOCAM simulator: LW raster observations of point sources, encoded as one revolution's TDF.

Seeded and deterministic. Produces the TDF (8192-byte buffers every 2 s, F1 housekeeping and
F2 imaging blocks), the EOH table (FITS bytes, observation boundaries in UTK), and the truth:
the readouts as encoded, the noiseless sky rate per EOI/RESET pair, the injected glitches,
the sources and the pointings. The format comes from `shared.instruments.isocam`, the same
module the pipeline decodes with.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray
from scipy.special import erf

from shared.instruments import isocam as ic

ARCSEC_PER_DEG = 3600.0


@dataclass(frozen=True, slots=True)
class ObservationConfig:
    """One CAM01-like raster observation."""

    sequence: int  #: 5-digit sequence in the revolution (observation number suffix)
    filter: str = "LW2"
    lens_arcsec: float = 6.0
    gain: int = 2
    tint_itk: int = 15  #: integration time in ITK units (15 x 0.14 s = 2.1 s)
    raster_m: int = 3  #: raster positions along the array Y axis
    raster_n: int = 3  #: ... along the array X axis
    step_arcsec: float = 21.0  #: raster step (3.5 pixels of 6": half-pixel sampling)
    pairs_per_position: int = 8  #: EOI/RESET pairs at each raster position
    ra_deg: float = 270.0
    dec_deg: float = 66.5
    roll_deg: float = 20.0
    n_sources: int = 30
    flux_range_jy: tuple[float, float] = (0.5e-3, 0.1)  #: log-uniform
    min_separation_arcsec: float = 24.0  #: sources are kept apart (no blending in this test)
    object_name: str = "FIELD"


@dataclass(frozen=True, slots=True)
class RevolutionConfig:
    """A short revolution (scaled down from 24 h) holding the observations."""

    seed: int = 1
    revolution: int = 129
    observations: tuple[ObservationConfig, ...] = (
        ObservationConfig(sequence=907, filter="LW2"),
        ObservationConfig(sequence=908, filter="LW3", ra_deg=270.3, dec_deg=66.4, roll_deg=-35.0),
    )
    start_utk: int = 301_400_000  #: UTK of buffer 0
    itk_at_start: int = 89_500_000  #: ITK at buffer 0
    itk_unit_s: float = ic.ITK_UNIT_S  #: true ITK unit
    boot_delay_s: float = 7.3  #: the F2BOOTTI counter is reset this long after buffer 0
    lead_s: float = 20.0  #: before the first observation
    gap_s: float = 30.0  #: between observations
    tail_s: float = 12.0  #: after the last one
    bias_adu: float = 400.0  #: mean readout offset
    bias_sigma_adu: float = 25.0  #: pixel-to-pixel offset spread
    read_noise_adu: float = 1.5  #: per readout
    electrons_per_adug: float = 10.0  #: photo-electrons per ADU/G (shot noise; ASSUMED)
    glitch_rate_per_s: float = 1.0
    glitch_pixels: int = 8
    glitch_peak_adu: tuple[float, float] = (40.0, 3000.0)  #: log-uniform peak in the EOI frame
    transient: ic.TransientModel = ic.TRANSIENT
    corrupt_buffers: tuple[int, ...] = ()  #: buffer indices whose payload gets flipped bytes


@dataclass(slots=True)
class IsocamSimulation:
    """Everything the simulator produced: telemetry, EOH and truth."""

    config: RevolutionConfig
    tdf: bytes  #: the revolution's TDF (8192-byte buffers)
    eoh: bytes  #: EOH table (FITS bytes)
    #: per readout, in time order: obsnum, itk, kind, gain, tint_itk, array (n, 1024 int16)
    readouts: dict[str, NDArray]
    #: per EOI/RESET pair: obsnum, itk_reset, sky_adug_s (n, 1024, noiseless sky rate before
    #: the flat, no dark/transient/glitch), position (raster index 1.., 0 = slew)
    pairs: dict[str, NDArray]
    #: injected glitches, one row per hit pixel: pair (index into `pairs`), pixel, adug_s
    glitches: dict[str, NDArray]
    sources: dict[str, Table] = field(default_factory=dict)  #: per obsnum: ra/dec/flux_jy
    pointings: dict[str, Table] = field(default_factory=dict)  #: per obsnum: position, ra, dec


def _offsets_to_sky(ra0: float, dec0: float, east_arcsec: NDArray, north_arcsec: NDArray
                    ) -> tuple[NDArray, NDArray]:
    dec = dec0 + north_arcsec / ARCSEC_PER_DEG
    ra = ra0 + east_arcsec / ARCSEC_PER_DEG / np.cos(np.radians(dec0))
    return ra, dec


def raster_pointings(obs: ObservationConfig) -> tuple[NDArray, NDArray]:
    """RA/Dec (deg) of the raster positions, stepping along the array axes (rotated by roll)."""
    m, n = np.meshgrid(np.arange(obs.raster_m), np.arange(obs.raster_n), indexing="ij")
    dy = (m.ravel() - (obs.raster_m - 1) / 2.0) * obs.step_arcsec  # along array +Y
    dx = (n.ravel() - (obs.raster_n - 1) / 2.0) * obs.step_arcsec  # along array +X
    w = ic.array_wcs(obs.ra_deg, obs.dec_deg, obs.roll_deg, 1.0)  # 1"/px: offsets in arcsec
    ra, dec = w.wcs_pix2world(ic.CENTER_PX + dx, ic.CENTER_PX + dy, 0)
    return np.asarray(ra), np.asarray(dec)


def _make_sources(obs: ObservationConfig, rng: np.random.Generator) -> Table:
    half = (ic.NPIX_SIDE * obs.lens_arcsec) / 2.0 + obs.step_arcsec * (max(obs.raster_m,
                                                                           obs.raster_n) - 1) / 2
    half -= 2.0 * obs.lens_arcsec
    pts: list[tuple[float, float]] = []
    while len(pts) < obs.n_sources:  # rejection sampling of a few dozen points
        p = rng.uniform(-half, half, 2)
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) >= obs.min_separation_arcsec for q in pts):
            pts.append((float(p[0]), float(p[1])))
    xy = np.array(pts)
    ra, dec = _offsets_to_sky(obs.ra_deg, obs.dec_deg, xy[:, 0], xy[:, 1])
    lo, hi = np.log(obs.flux_range_jy[0]), np.log(obs.flux_range_jy[1])
    t = Table()
    t["source_id"] = np.arange(obs.n_sources, dtype=np.int32)
    t["ra_deg"] = ra
    t["dec_deg"] = dec
    t["flux_jy"] = np.exp(rng.uniform(lo, hi, obs.n_sources))
    return t


def sky_rate(obs: ObservationConfig, sources: Table, ra_deg: float, dec_deg: float
             ) -> NDArray[np.float64]:
    """Noiseless sky photocurrent (ADU/G/s) per pixel before the flat, (1024,)."""
    flt = ic.FILTERS[obs.filter]
    img = np.full((ic.NPIX_SIDE, ic.NPIX_SIDE), flt.background_adug_s * (obs.lens_arcsec / 6.0)
                  ** 2)
    w = ic.array_wcs(ra_deg, dec_deg, obs.roll_deg, obs.lens_arcsec)
    x, y = w.wcs_world2pix(np.asarray(sources["ra_deg"]), np.asarray(sources["dec_deg"]), 0)
    sig = ic.psf_fwhm_arcsec(obs.filter) / obs.lens_arcsec / 2.3548
    edges = np.arange(ic.NPIX_SIDE + 1) - 0.5
    # Pixel-integrated Gaussian: separable erf differences (exact for a Gaussian PSF).
    fx = np.diff(0.5 * erf((edges[None, :] - x[:, None]) / (np.sqrt(2) * sig)), axis=1)
    fy = np.diff(0.5 * erf((edges[None, :] - y[:, None]) / (np.sqrt(2) * sig)), axis=1)
    rate = np.asarray(sources["flux_jy"]) * ic.flux_conversion(obs.filter, obs.lens_arcsec)
    img += np.einsum("s,sy,sx->yx", rate, fy, fx)
    return img.ravel()


def _eoh_bytes(rows: list[dict[str, object]], revolution: int) -> bytes:
    t = Table(rows=rows, names=("OBSNUM", "UTKSTART", "UTKEND", "AOT", "OBJECT"),
              dtype=("S8", ">i4", ">i4", "S8", "S16"))
    hdu = fits.BinTableHDU(t, name="EOHC")
    prim = fits.PrimaryHDU()
    prim.header["TELESCOP"] = ic.TELESCOP
    prim.header["FILENAME"] = ic.product_name("EOHC", f"{revolution:03d}")
    prim.header["REVOLUTN"] = revolution
    buf = io.BytesIO()
    fits.HDUList([prim, hdu]).writeto(buf, checksum=True)
    return buf.getvalue()


def simulate_revolution(cfg: RevolutionConfig = RevolutionConfig()) -> IsocamSimulation:
    """Simulate a revolution's observations and encode them as a TDF + EOH."""
    rng = np.random.default_rng(cfg.seed)
    itku = cfg.itk_unit_s
    flat = ic.flat_model().ravel()
    dark = ic.dark_model().ravel()
    bias = cfg.bias_adu + cfg.bias_sigma_adu * rng.standard_normal(ic.NPIX)
    camitk0 = cfg.itk_at_start + int(np.floor(cfg.boot_delay_s / itku))
    tr = cfg.transient

    ro: dict[str, list] = {k: [] for k in ("obsnum", "itk", "kind", "gain", "tint_itk", "array",
                                           "ra", "dec", "roll", "lens", "filter")}
    pr: dict[str, list] = {k: [] for k in ("obsnum", "itk_reset", "sky_adug_s", "position")}
    gl: dict[str, list] = {k: [] for k in ("pair", "pixel", "adug_s")}
    eoh_rows: list[dict[str, object]] = []
    sources: dict[str, Table] = {}
    pointings: dict[str, Table] = {}
    t_s = cfg.lead_s  # seconds since buffer 0
    for obs in cfg.observations:
        obsnum = ic.obs_number(cfg.revolution, obs.sequence)
        src = _make_sources(obs, rng)
        sources[obsnum] = src
        ra_p, dec_p = raster_pointings(obs)
        pointings[obsnum] = Table({"position": np.arange(1, ra_p.size + 1), "ra_deg": ra_p,
                                   "dec_deg": dec_p})
        scenes = np.array([sky_rate(obs, src, a, d) for a, d in zip(ra_p, dec_p, strict=True)])
        utk_start = cfg.start_utk + int(np.floor(t_s * ic.UTK_PER_S))
        itk = cfg.itk_at_start + int(np.ceil(t_s / itku)) + 2
        bg_only = flat * ic.FILTERS[obs.filter].background_adug_s * (obs.lens_arcsec / 6.0) ** 2
        lag = bg_only.copy()  # detector memory: the sky before the observation was background
        tint_s = obs.tint_itk * itku
        seq: list[tuple[int, int, int]] = []  # (position index, reset pointing, eoi pointing)
        for p in range(ra_p.size):
            if p > 0:
                seq.append((0, p - 1, p))  # slew pair: RESET at the old, EOI at the new position
            seq.extend([(p + 1, p, p)] * obs.pairs_per_position)
        for pos, p_reset, p_eoi in seq:
            sky = 0.5 * (scenes[p_reset] + scenes[p_eoi])
            photo = sky * flat
            c = tr.tau_s / tint_s * (1.0 - np.exp(-tint_s / tr.tau_s))
            mean_lag = photo + (lag - photo) * c
            measured = (1.0 - tr.fraction) * photo + tr.fraction * mean_lag
            lag = photo + (lag - photo) * np.exp(-(obs.tint_itk + 1) * itku / tr.tau_s)
            rate = measured + dark
            e = rng.poisson(np.maximum(rate, 0.0) * tint_s * cfg.electrons_per_adug)
            sig_adu = e / cfg.electrons_per_adug * obs.gain
            reset = bias + cfg.read_noise_adu * rng.standard_normal(ic.NPIX)
            eoi = bias + sig_adu + cfg.read_noise_adu * rng.standard_normal(ic.NPIX)
            ipair = len(pr["obsnum"])
            n_gl = rng.poisson(cfg.glitch_rate_per_s * tint_s)
            for _ in range(n_gl):  # ~2 glitches per pair: a tiny loop
                cy, cx = rng.integers(1, ic.NPIX_SIDE - 1, 2)
                nb = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
                pick = rng.choice(len(nb), cfg.glitch_pixels - 1, replace=False)
                peak = np.exp(rng.uniform(*np.log(cfg.glitch_peak_adu)))
                pix = [(cy, cx)] + [(cy + nb[k][0], cx + nb[k][1]) for k in pick]
                amp = np.concatenate([[peak], peak * rng.uniform(0.1, 0.5, len(pick))])
                for (yy, xx), a in zip(pix, amp, strict=True):
                    if xx == ic.DEAD_COLUMN:
                        continue
                    eoi[yy * ic.NPIX_SIDE + xx] += a
                    gl["pair"].append(ipair)
                    gl["pixel"].append(yy * ic.NPIX_SIDE + xx)
                    gl["adug_s"].append(a / obs.gain / tint_s)
            for kind, arr, pnt, k_itk in ((ic.ReadoutKind.RESET, reset, p_reset, itk),
                                          (ic.ReadoutKind.EOI, eoi, p_eoi, itk + obs.tint_itk)):
                a16 = np.clip(np.rint(arr), -32768, ic.ADU_MAX).astype(np.int16)
                a16.reshape(ic.NPIX_SIDE, ic.NPIX_SIDE)[:, ic.DEAD_COLUMN] = 0
                ro["obsnum"].append(obsnum)
                ro["itk"].append(k_itk)
                ro["kind"].append(int(kind))
                ro["gain"].append(obs.gain)
                ro["tint_itk"].append(obs.tint_itk)
                ro["array"].append(a16)
                ro["ra"].append(ra_p[pnt])
                ro["dec"].append(dec_p[pnt])
                ro["roll"].append(obs.roll_deg)
                ro["lens"].append(obs.lens_arcsec)
                ro["filter"].append(obs.filter)
            pr["obsnum"].append(obsnum)
            pr["itk_reset"].append(itk)
            pr["sky_adug_s"].append(sky)
            pr["position"].append(pos)
            itk += obs.tint_itk + 1
        t_end_s = (itk + 2 - cfg.itk_at_start) * itku
        utk_end = cfg.start_utk + int(np.ceil(t_end_s * ic.UTK_PER_S))
        eoh_rows.append({"OBSNUM": obsnum, "UTKSTART": utk_start, "UTKEND": utk_end,
                         "AOT": "CAM01", "OBJECT": obs.object_name})
        t_s = t_end_s + cfg.gap_s
    total_s = t_s - cfg.gap_s + cfg.tail_s

    readouts = {k: np.array(v) for k, v in ro.items()}
    readouts["array"] = np.array(ro["array"], dtype=np.int16).reshape(-1, ic.NPIX)
    tdf = _encode(cfg, readouts, camitk0, total_s)
    pairs = {k: np.array(v) for k, v in pr.items()}
    glitches = {k: np.array(v) for k, v in gl.items()}
    return IsocamSimulation(cfg, tdf, _eoh_bytes(eoh_rows, cfg.revolution), readouts, pairs,
                            glitches, sources, pointings)


def _encode(cfg: RevolutionConfig, ro: dict[str, NDArray], camitk0: int, total_s: float) -> bytes:
    """Pack the readouts into F2 blocks, add an F1 block per buffer, checksum the buffers."""
    itku = cfg.itk_unit_s
    n_buf = int(np.ceil(total_s / ic.BUFFER_PERIOD_S))
    t_read_s = (ro["itk"] - cfg.itk_at_start) * itku
    buf_of = np.floor(t_read_s / ic.BUFFER_PERIOD_S).astype(np.int64)
    f2 = np.zeros(ro["itk"].size, dtype=ic.F2_BLOCK)
    f2["block_id"] = ic.F2_ID
    f2["block_len"] = ic.F2_BLOCK.itemsize
    f2["bootti"] = ro["itk"] - camitk0
    f2["readcnt"] = np.arange(ro["itk"].size)
    f2["kind"] = ro["kind"]
    f2["gain"] = ro["gain"]
    f2["tint_itk"] = ro["tint_itk"]
    f2["lens_das"] = np.rint(np.asarray(ro["lens"]) * 10).astype(int)
    f2["filter"] = np.char.encode(ro["filter"].astype(str), "ascii")
    f2["ra_deg"], f2["dec_deg"], f2["roll_deg"] = ro["ra"], ro["dec"], ro["roll"]
    f2["array"] = ro["array"]
    out = np.zeros((n_buf, ic.BUFFER_BYTES), dtype=np.uint8)
    hdr = np.zeros(n_buf, dtype=ic.BUFFER_HEADER)
    hdr["sync"], hdr["ident"], hdr["revolution"] = ic.SYNC, ic.IDENT, cfg.revolution
    hdr["bufcount"] = np.arange(n_buf)
    hdr["utk"] = cfg.start_utk + np.arange(n_buf) * ic.UTK_PER_BUFFER
    t_buf_s = np.arange(n_buf) * ic.BUFFER_PERIOD_S
    itk_buf = cfg.itk_at_start + np.floor(t_buf_s / itku).astype(np.int64)
    f1 = np.zeros(n_buf, dtype=ic.F1_BLOCK)
    f1["block_id"], f1["block_len"] = ic.F1_ID, ic.F1_BLOCK.itemsize
    f1["itk"] = itk_buf
    f1["bootti"] = np.maximum(itk_buf - camitk0, 0)  # counter held at 0 until its reset
    f1["det_temp_mk"] = ic.DET_TEMP_MK
    starts = np.searchsorted(buf_of, np.arange(n_buf + 1))
    for b in range(n_buf):  # a few hundred buffers: simple per-buffer packing
        blocks = f2[starts[b]:starts[b + 1]]
        if blocks.size > ic.MAX_F2_PER_BUFFER:
            raise ValueError(f"{blocks.size} readouts in buffer {b}: the integration time is too "
                             "short for the telemetry rate")
        payload = f1[b].tobytes() + blocks.tobytes()
        hdr["nbytes"][b] = len(payload)
        out[b, ic.HEADER_BYTES:ic.HEADER_BYTES + len(payload)] = np.frombuffer(payload, np.uint8)
    out[:, :ic.HEADER_BYTES] = hdr.view(np.uint8).reshape(n_buf, ic.HEADER_BYTES)
    out.view(">u4")[:, ic.CHECKSUM_WORD] = ic.buffer_checksum(out)
    for b in cfg.corrupt_buffers:  # after the checksum: transmission errors
        out[b, 1000:1010] ^= 0x5A
    return out.tobytes()
