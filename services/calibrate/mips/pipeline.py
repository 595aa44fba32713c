"""The MIPS calibration entry points: one 24 um DCE, or one Ge AOR+channel group, to BCDs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from astropy.io import fits

from services.calibrate.mips import cosmics, dark, filtering, firstframe, flat, fluxcal, ramps, stim
from services.calibrate.mips import pmask as pmask_step
from services.calibrate.mips.bcd import BCDProducts, assemble
from services.calibrate.mips.calfiles import MipsCalibration
from services.calibrate.mips.config import MipsCalibrateConfig
from services.calibrate.mips.errors import RawProductError
from services.calibrate.mips.steps import COMPLETE, SKIPPED, StepRecord
from shared.instruments import mips
from shared.instruments.mips import FATAL_BITS, MaskBit

#: Raw-header keywords calibrate cannot do without.
REQUIRED_KEYWORDS = (
    "CHNLNUM",
    "AORKEY",
    "EXPID",
    "DCENUM",
    "EXPTIME",
    "NSAMPLES",
    "RA_REF",
    "DEC_REF",
    "PA_REF",
    "SATLEVEL",
)


def default_creator() -> str:
    """'skybus <installed version>' for the CREATOR keyword."""
    try:
        return f"skybus {metadata.version('skybus')}"
    except metadata.PackageNotFoundError:
        return "skybus unknown"


@dataclass(frozen=True, slots=True)
class _RawDCE:
    header: fits.Header
    cube: np.ndarray
    channel: int
    expid: int
    dcenum: int
    time_s: float
    is_stim: bool


def _read_raw(raw: fits.HDUList, channels: tuple[int, ...]) -> _RawDCE:
    if len(raw) == 0 or raw[0].data is None:
        raise RawProductError("raw DCE has no primary image: re-decode it from telemetry")
    header = raw[0].header
    for key in REQUIRED_KEYWORDS:
        if key not in header:
            raise RawProductError(f"raw DCE header lacks {key}: re-decode it", keyword=key)
    channel = int(header["CHNLNUM"])
    where = f"AOR {header['AORKEY']} ch {channel} EXPID {header['EXPID']} DCE {header['DCENUM']}"
    if channel not in channels:
        raise RawProductError(
            f"{where}: CHNLNUM {channel} is not one of {channels} for this entry point",
            keyword="CHNLNUM",
        )
    band = mips.BANDS[channel]
    cube = np.asarray(raw[0].data)
    nsamples = int(header["NSAMPLES"])
    expected = (2, band.nrows, band.ncols) if channel == 1 else (nsamples, band.nrows, band.ncols)
    if cube.shape != expected:
        raise RawProductError(f"{where}: data shape {cube.shape}, expected {expected}")
    if "SCLK_OBS" in header:
        time_s = float(header["SCLK_OBS"])
    elif "MJD_OBS" in header:
        time_s = float(header["MJD_OBS"]) * 86400.0
    else:
        raise RawProductError(f"{where}: neither SCLK_OBS nor MJD_OBS in the header")
    # mid-exposure time, so DCEs of different lengths interpolate fairly
    time_s += 0.5 * float(header["EXPTIME"])
    return _RawDCE(
        header=header,
        cube=cube,
        channel=channel,
        expid=int(header["EXPID"]),
        dcenum=int(header["DCENUM"]),
        time_s=time_s,
        is_stim=bool(header.get("STIMFLSH", False)),
    )


def _noise(header: fits.Header, read_noise_dn: float, gain: float) -> tuple[float, float]:
    """Read noise (DN) and gain (e-/DN): the raw header's RONOISE/GAIN win over the config."""
    rn = float(header.get("RONOISE", read_noise_dn))
    g = float(header.get("GAIN", gain))
    return rn, g


def calibrate_mips24_dce(
    raw: fits.HDUList,
    cal: MipsCalibration,
    config: MipsCalibrateConfig | None = None,
    *,
    creator: str | None = None,
    version: int = 1,
) -> BCDProducts:
    """Calibrate one 24 um raw DCE to its BCD (MJy/sr), bunc (1-sigma MJy/sr) and bbmsk.

    Steps (each recorded in the header): RAMPFIT (slope plane in DN/sample / SLPSCALE to DN/s;
    first difference where the ramp saturated), PMASKAPP, DARKSUB (DN/s), FLATFLD, DCECORR
    (first-frame / early-DCE response), FLUXCAL (FLUXCONV MJy/sr per DN/s), CRFLAG (radiation
    hits flagged, not removed). The inverse of
    rate_dn_s = sky_mjysr / FLUXCONV * flat * f_dce + dark_dn_s.
    Raises `RawProductError` for a malformed raw product, `CalibrationFileError` for a
    calibration image of the wrong shape.
    """
    cfg = config or MipsCalibrateConfig()
    dce = _read_raw(raw, (1,))
    header = dce.header
    if "SLPSCALE" not in header or float(header["SLPSCALE"]) <= 0:
        raise RawProductError(
            "24 um raw DCE lacks a positive SLPSCALE: re-decode it", keyword="SLPSCALE"
        )
    shape = dce.cube.shape[1:]
    read_noise, gain = _noise(header, cfg.si_read_noise_dn, cfg.si_gain_e_per_dn)
    rates = ramps.si_rates(
        dce.cube,
        slope_scale=float(header["SLPSCALE"]),
        n_samples=int(header["NSAMPLES"]),
        sat_level_dn=float(header["SATLEVEL"]),
        read_noise_dn=read_noise,
        gain_e_per_dn=gain,
        saturation_fraction=cfg.saturation_fraction,
    )
    records: list[StepRecord] = [
        StepRecord(
            "RAMPFIT",
            COMPLETE,
            (
                f"RAMPFIT: on-board slope / SLPSCALE {header['SLPSCALE']} / {mips.SI_SAMPLE_S} s; "
                f"{rates.n_saturated} saturated pixels from the first difference "
                f"(saturation fraction {cfg.saturation_fraction:g}); read noise {read_noise:g} DN, "
                f"gain {gain:g} e-/DN",
            ),
            cards={"NSATDIFF": (rates.n_saturated, "pixels with rate from first difference")},
        )
    ]
    mask = rates.mask.copy()
    static, rec = pmask_step.static_mask(1, shape, cal.image(1, "PMASK", shape))
    mask |= static
    records.append(rec)
    signal, var, m, rec = dark.subtract_dark(
        rates.rate_dn_s,
        rates.var_dn2_s2,
        cal.image(1, "DARK", shape),
        dark_unc_dn_s=cfg.dark_unc_dn_s,
    )
    mask |= m
    records.append(rec)
    signal, var, m, rec = flat.divide_flat(
        signal, var, cal.image(1, "FLAT", shape), flat_unc_frac=cfg.flat_unc_frac
    )
    mask |= m
    records.append(rec)
    signal, var, m, rec = firstframe.correct_first_frames(
        signal,
        var,
        dce.dcenum,
        first_dce_depression=cfg.first_dce_depression,
        early_dce_depression=cfg.early_dce_depression,
    )
    mask |= m
    records.append(rec)
    image, var, rec = fluxcal.to_mjysr(signal, var, 1)
    records.append(rec)
    unc = np.sqrt(var)
    ignore = (mask & int(MaskBit.PMASK | MaskBit.SATURATED_FROM_DIFF | MaskBit.UNC_STATUS)) != 0
    bad = (mask & int(MaskBit.PMASK | MaskBit.UNC_STATUS)) != 0
    hits, rec = cosmics.flag_radhits(
        image,
        unc,
        ignore,
        bad,
        nsigma=cfg.cr_nsigma,
        neighbour_ratio=cfg.cr_neighbour_ratio,
        background_box_px=cfg.cr_background_box_px,
    )
    mask[hits] |= int(MaskBit.RADHIT)
    records.append(rec)
    return assemble(
        header,
        channel=1,
        bcd_mjysr=image,
        unc_mjysr=unc,
        mask_bits=mask,
        records=records,
        config=cfg,
        creator=creator or default_creator(),
        version=version,
    )


def calibrate_ge_group(
    raws: Sequence[fits.HDUList],
    cal: MipsCalibration,
    config: MipsCalibrateConfig | None = None,
    *,
    creator: str | None = None,
    version: int = 1,
) -> list[BCDProducts]:
    """Calibrate all raw DCEs of one AOR and one Ge channel (70 or 160 um), stims included.

    Returns one `BCDProducts` (bcd, bunc, bmask, fbcd; MJy/sr) per science DCE in time order;
    stim DCEs (STIMFLSH = T) are used only to measure the responsivity and produce no BCD.
    Steps: RAMPFIT (ramp fit with cosmic-ray jump rejection, DN/s), PMASKAPP, DARKSUB (DN/s),
    RESPCORR (R(t) = (stim - background) / (STIMLVL * flat), linear in time, nearest-in-time
    flagged NO_STIM), FLATFLD, FLUXCAL (FLUXCONV MJy/sr per instrument unit); fbcd = bcd minus
    the per-pixel temporal median of the group minus each column's median. The inverse of
    rate_dn_s = (sky_mjysr / FLUXCONV + stim_iu) * R(t) * flat + dark_dn_s.
    Raises `RawProductError` for a malformed DCE or a group mixing AORs or channels.
    """
    cfg = config or MipsCalibrateConfig()
    dces = sorted((_read_raw(r, (2, 3)) for r in raws), key=lambda d: (d.time_s, d.expid, d.dcenum))
    if not dces:
        return []
    channel = dces[0].channel
    aorkeys = {int(d.header["AORKEY"]) for d in dces}
    if len(aorkeys) > 1 or any(d.channel != channel for d in dces):
        raise RawProductError(
            f"a Ge group must be one AOR and one channel; got AORKEYs {sorted(aorkeys)} and "
            f"channels {sorted({d.channel for d in dces})}: split the group"
        )
    band = mips.BANDS[channel]
    shape = (band.nrows, band.ncols)
    static, pmask_rec = pmask_step.static_mask(channel, shape, cal.image(channel, "PMASK", shape))
    dark_img = cal.image(channel, "DARK", shape)
    flat_img = cal.image(channel, "FLAT", shape)
    stim_cal = cal.get(channel, "STIM")

    signals: list[np.ndarray] = []
    variances: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    ramp_lines: list[str] = []
    dark_rec = StepRecord("DARKSUB", SKIPPED, ("DARKSUB: no DARK",))
    for d in dces:
        read_noise, gain = _noise(d.header, cfg.ge_read_noise_dn, cfg.ge_gain_e_per_dn)
        n_ramps = int(d.header.get("NRAMPS", 1))
        try:
            rates = ramps.ge_rates(
                d.cube,
                n_ramps=n_ramps,
                sat_level_dn=float(d.header["SATLEVEL"]),
                read_noise_dn=read_noise,
                gain_e_per_dn=gain,
                jump_nsigma=cfg.jump_nsigma,
                sample_dt_s=float(d.header.get("SAMPTIME", 1.0 / mips.GE_SAMPLE_RATE_HZ)),
            )
        except ValueError as exc:
            raise RawProductError(
                f"EXPID {d.expid} DCE {d.dcenum}: {exc} (NRAMPS)", keyword="NRAMPS"
            ) from exc
        ramp_lines.append(
            f"RAMPFIT: {n_ramps} ramp(s), jump nsigma {cfg.jump_nsigma:g}: "
            f"{rates.n_jumps} jumps, {rates.n_saturated} pixels reached full well; "
            f"read noise {read_noise:g} DN, gain {gain:g} e-/DN"
        )
        sig, var, m, dark_rec = dark.subtract_dark(
            rates.rate_dn_s, rates.var_dn2_s2, dark_img, dark_unc_dn_s=cfg.dark_unc_dn_s
        )
        signals.append(sig)
        variances.append(var)
        masks.append(rates.mask | m | static)

    flat_data = np.ones(shape)
    if flat_img is not None:
        flat_data = np.where(np.isfinite(flat_img.data) & (flat_img.data > 0), flat_img.data, 1.0)
    is_stim = [d.is_stim for d in dces]
    stims: list[stim.StimMeasurement] = []
    if stim_cal is not None and any(is_stim):
        good = [(m & (FATAL_BITS | int(MaskBit.NO_CALIBRATION))) == 0 for m in masks]
        stims = stim.measure_stims(
            [d.time_s for d in dces],
            signals,
            is_stim,
            good,
            flat_data,
            stim_level_iu=float(stim_cal.header["STIMLVL"]),
            min_responsivity=cfg.min_responsivity,
            stim_pattern=stim_cal.data if stim_cal.data.shape == shape else None,
        )
    resp_status = COMPLETE if any(s.valid for s in stims) else SKIPPED
    resp_lines = [
        f"RESPCORR: stim at t={s.time_s:.1f} s R={s.responsivity:.5g}+-{s.responsivity_unc:.2g} "
        f"({s.n_pixels} px){'' if s.valid else ' rejected'}"
        for s in stims
    ]
    if stim_cal is None:
        resp_lines.append("RESPCORR: no STIM calibration file: responsivity 1 assumed")
    elif not any(is_stim):
        resp_lines.append("RESPCORR: no stim DCE in the group: responsivity 1 assumed")

    science: list[tuple[_RawDCE, np.ndarray, np.ndarray, np.ndarray, list[StepRecord], str]] = []
    for d, sig, var, m in zip(dces, signals, variances, masks, strict=True):
        if d.is_stim:
            continue
        resp = stim.responsivity_at(d.time_s, stims, min_responsivity=cfg.min_responsivity)
        m = m.copy()
        if resp.no_stim:
            m |= int(MaskBit.NO_STIM)
        s_iu = sig / resp.value
        v_iu = var / resp.value**2
        s_iu, v_iu, mf, flat_rec = flat.divide_flat(
            s_iu, v_iu, flat_img, flat_unc_frac=cfg.flat_unc_frac
        )
        m |= mf
        image, v_img, flux_rec = fluxcal.to_mjysr(s_iu, v_iu, channel)
        resp_rec = StepRecord(
            "RESPCORR",
            resp_status,
            (*resp_lines, f"RESPCORR: this DCE R={resp.value:.5g} ({resp.method})"),
            ("STIMFILE", stim_cal.name) if stim_cal is not None else None,
            cards={
                "RESPONSV": (resp.value, "DN/s per instrument unit applied"),
                "RESPMETH": (resp.method, "responsivity: interp, nearest or none"),
            },
        )
        records = [
            StepRecord("RAMPFIT", COMPLETE, (ramp_lines[dces.index(d)],)),
            pmask_rec,
            dark_rec,
            resp_rec,
            flat_rec,
            flux_rec,
        ]
        science.append((d, image, np.sqrt(v_img), m, records, resp.method))

    fbcds = (
        filtering.median_filter_group(
            [s[1] for s in science],
            [(s[3] & FATAL_BITS) == 0 for s in science],
            temporal=cfg.fbcd_temporal_median,
            column=cfg.fbcd_column_median,
        )
        if science
        else []
    )
    filt_line = (
        f"FBCD: temporal median {cfg.fbcd_temporal_median} over {len(science)} DCEs, "
        f"column median {cfg.fbcd_column_median}"
    )
    out: list[BCDProducts] = []
    for (d, image, unc, m, records, _), fimg in zip(science, fbcds, strict=True):
        records = [*records, StepRecord("MEDFILT", COMPLETE, (filt_line,))]
        out.append(
            assemble(
                d.header,
                channel=channel,
                bcd_mjysr=image,
                unc_mjysr=np.where(np.isfinite(unc), unc, np.float32(math.inf)),
                mask_bits=m,
                records=records,
                config=cfg,
                creator=creator or default_creator(),
                version=version,
                fbcd_mjysr=fimg,
            )
        )
    return out
