"""Post-BCD mosaic: select frames, self-flat, match backgrounds, reject outliers, coadd.

`build_mosaic` is the step's pure entry point: BCD frames in memory in, a `Mosaic` (image,
uncertainty and coverage maps on a TAN grid, the offsets subtracted, the rmask of every input
frame) out. It reads everything from the frames' headers (TAN-SIP WCS, BUNIT, INSTRUME,
CHNLNUM, DCENUM), so it works on BCDs from skybus calibrate and from other tools alike.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from astropy.io import fits

from services.mosaic.grid import GridError, OutputGrid, native_pixel_arcsec, output_grid
from services.mosaic.outliers import find_outliers, single_frame_spikes
from services.mosaic.overlap import match_backgrounds
from services.mosaic.resample import drizzle, map_frames
from services.mosaic.selfflat import SelfFlatError, make_self_flat
from shared.bcd import BCDFrame
from shared.instruments import mips


class MosaicError(ValueError):
    """The frames cannot be mosaicked; the message says what is wrong and what to do."""


class NoUsableFramesError(MosaicError):
    """Every frame was dropped (DCENUM 0, all pixels masked or NaN, no WCS)."""


class InconsistentFramesError(MosaicError):
    """The frames mix instruments, channels or units and cannot share one mosaic."""


@dataclass(frozen=True, slots=True)
class Mosaic:
    """A coadded mosaic and what was done to its input frames.

    Maps are float32 of the grid's shape; `image` and `unc` are in `bunit` (MJy/sr for
    Spitzer) and NaN where no frame contributes; `coverage` is the number of frames per
    output pixel (fractional at footprint edges). Per-frame arrays follow the order of the
    frames given to `build_mosaic`, dropped frames included.
    """

    image: np.ndarray
    unc: np.ndarray
    coverage: np.ndarray
    header: fits.Header  #: output WCS (TAN, no SIP), BUNIT, PXSCAL1/2
    offsets_mjysr: np.ndarray  #: offset subtracted from each frame (input unit); NaN = unused
    rmasks: tuple[np.ndarray, ...]  #: uint16 per frame, `mips.MaskBit.OUTLIER` where rejected
    used: np.ndarray  #: bool per frame
    outliers_per_frame: np.ndarray  #: int per frame
    unc_scale: np.ndarray  #: factor applied to each frame's unc (1 = trusted as given)
    frame_keys: tuple[str, ...]
    notes: tuple[str, ...]  #: why frames were dropped or corrected, one line each
    pixel_arcsec: float
    bunit: str
    flat: np.ndarray | None = None  #: the self-flat divided through, if any
    parameters: dict[str, object] = field(default_factory=dict)

    @property
    def n_frames_in(self) -> int:
        return int(self.used.size)

    @property
    def n_frames_used(self) -> int:
        return int(self.used.sum())

    @property
    def n_outliers(self) -> int:
        return int(self.outliers_per_frame.sum())


def _empirical_noise(data: np.ndarray, valid: np.ndarray) -> float:
    """Robust pixel noise from first differences along rows (insensitive to smooth sky)."""
    both = valid[:, 1:] & valid[:, :-1]
    if both.sum() < 16:
        return float("nan")
    diff = (data[:, 1:] - data[:, :-1])[both].astype(np.float64)
    return 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / math.sqrt(2.0)


def _frame_identity(frame: BCDFrame) -> tuple[str, int, str]:
    h = frame.header
    return (
        str(h.get("INSTRUME", "")).strip(),
        int(h.get("CHNLNUM", 0)),
        str(h.get("BUNIT", "")).strip(),
    )


def has_first_frame_effect(frame: BCDFrame) -> bool:
    """Whether DCENUM 0 of this frame's array is depressed: the MIPS 24 um Si:As array only.
    The MIPS Ge:Ga channels (CHNLNUM 2, 3) have no first-frame effect, and other instruments'
    DCENUM does not count DCEs within a MIPS cycle (every IRAC BCD is DCENUM 0)."""
    h = frame.header
    return str(h.get("INSTRUME", "")).strip().upper() == "MIPS" and int(h.get("CHNLNUM", 1)) == 1


def build_mosaic(
    frames: Sequence[BCDFrame],
    *,
    pixel_arcsec: float | None = None,
    fatal_bits: int = mips.FATAL_BITS,
    drop_first_dce: bool = True,
    self_flat: bool = False,
    match_background: bool = True,
    outlier_sigma: float | None = 4.0,
    outlier_frac: float = 0.5,
    min_coverage: int = 3,
    weighting: Literal["frame", "pixel"] = "frame",
    pixfrac: float = 1.0,
    overlap_cell_px: int = 8,
    unc_tolerance: float = 10.0,
    output_header: fits.Header | None = None,
) -> Mosaic:
    """Coadd BCD frames into a mosaic (surface brightness in, surface brightness out).

    - `pixel_arcsec`: output pixel side; default `mips.BANDS[ch].mosaic_pixel_arcsec` for
      INSTRUME='MIPS', else the frames' native scale. Ignored when `output_header` (a TAN
      header with NAXIS1/2) fixes the grid.
    - `fatal_bits`: mask bits whose pixels carry no flux. `drop_first_dce` skips DCENUM 0
      of arrays with a first-frame effect (the MIPS 24 um array).
    - `self_flat`: divide the frames by their own median flat first (needs >= 5 frames).
    - `match_background`: subtract per-frame offsets (sum 0) levelling the overlaps.
    - `outlier_sigma`: temporal clipping threshold (None skips it); `outlier_frac` the
      fraction of the local brightness derivative tolerated; `min_coverage` the least stack
      depth judged.
    - `weighting`: "frame" weights each frame by 1/median(unc^2) (unbiased on bright
      sources, whose per-pixel unc holds their own Poisson noise); "pixel" by 1/unc^2.
    - `pixfrac`: drizzle footprint shrink factor (1 = whole pixel).
    - `unc_tolerance`: a frame whose median unc differs from its measured pixel noise by
      more than this factor has its unc rescaled to the measured noise (and a note).
    """
    frames = list(frames)
    n = len(frames)
    if n == 0:
        raise NoUsableFramesError("no frames given; a mosaic needs at least one BCD")
    notes: list[str] = []
    keys = tuple(f.key or f"frame[{i}]" for i, f in enumerate(frames))
    used = np.zeros(n, dtype=bool)
    unc_scale = np.ones(n)
    valid: list[np.ndarray] = [np.zeros(f.data.shape, dtype=bool) for f in frames]
    uncs: list[np.ndarray] = [f.unc for f in frames]
    for i, f in enumerate(frames):
        if not f.has_consistent_arrays:
            notes.append(f"{keys[i]}: data/unc/mask shapes differ or are not 2-D; dropped")
            continue
        if drop_first_dce and f.dcenum == 0 and has_first_frame_effect(f):
            notes.append(f"{keys[i]}: DCENUM 0 (first-frame effect); dropped")
            continue
        ok = f.usable_pixels(fatal_bits)
        if not ok.any():
            notes.append(f"{keys[i]}: no valid pixel (all NaN, flagged by fatal_bits, or "
                         "unc <= 0); dropped")
            continue
        med_unc = float(np.median(f.unc[ok]))
        noise = _empirical_noise(f.data, ok)
        if math.isfinite(noise) and noise > 0:
            ratio = noise / med_unc
            if ratio > unc_tolerance or ratio < 1.0 / unc_tolerance:
                unc_scale[i] = ratio
                uncs[i] = (f.unc * ratio).astype(np.float32)
                notes.append(
                    f"{keys[i]}: median unc {med_unc:.3g} disagrees with measured noise "
                    f"{noise:.3g}; unc rescaled by {ratio:.3g}"
                )
        valid[i] = ok
        used[i] = True
    if not used.any():
        # why, counted by reason (the notes are "<frame>: <reason>")
        reasons = Counter(note.split(": ", 1)[-1] for note in notes)
        raise NoUsableFramesError(
            f"no usable frame among {n}: "
            + "; ".join(f"{k} x {reason}" for reason, k in reasons.most_common())
        )
    idx = np.flatnonzero(used)
    identities = {_frame_identity(frames[i]) for i in idx}
    if len(identities) > 1:
        raise InconsistentFramesError(
            f"frames mix instrument/channel/unit {sorted(identities)}; mosaic each separately"
        )
    instrume, channel, bunit = identities.pop()

    values: list[np.ndarray] = [f.data for f in frames]
    flat: np.ndarray | None = None
    if self_flat:
        try:
            flat = make_self_flat([frames[i].data for i in idx], [valid[i] for i in idx])
        except SelfFlatError as exc:
            raise MosaicError(str(exc)) from exc
        good_flat = np.isfinite(flat) & (flat > 0)
        safe = np.where(good_flat, flat, 1.0)
        for i in idx.tolist():
            values[i] = (frames[i].data / safe).astype(np.float32)
            uncs[i] = (uncs[i] / safe).astype(np.float32)
            valid[i] = valid[i] & good_flat

    if output_header is not None:
        grid = OutputGrid.from_header(output_header)
    else:
        if pixel_arcsec is None:
            if instrume.upper() == "MIPS" and channel in mips.BANDS:
                pixel_arcsec = mips.BANDS[channel].mosaic_pixel_arcsec
            else:
                pixel_arcsec = native_pixel_arcsec(frames[idx[0]])
        try:
            grid = output_grid([frames[i] for i in idx], pixel_arcsec=pixel_arcsec)
        except GridError as exc:
            raise MosaicError(str(exc)) from exc
        if grid.shape[0] * grid.shape[1] > 400_000_000:
            raise MosaicError(
                f"output grid {grid.shape} is too large; check the frames' WCS or split the field"
            )

    used_frames = [frames[i] for i in idx]
    samples = map_frames(
        used_frames,
        [valid[i] for i in idx],
        grid,
        values=[values[i] for i in idx],
        uncs=[uncs[i] for i in idx],
    )
    offsets = np.zeros(idx.size)
    if match_background and idx.size >= 2:
        offsets = match_backgrounds(
            samples, n_frames=idx.size, grid_shape=grid.shape, cell_px=overlap_cell_px
        )
        samples = samples.with_values((samples.value - offsets[samples.frame]).astype(np.float32))

    outliers_per_frame = np.zeros(n, dtype=np.int64)
    rmasks = [np.zeros(f.data.shape, dtype=np.uint16) for f in frames]
    if outlier_sigma is not None:
        # Per frame, its one-pixel spikes (judged only where the stack is too shallow).
        spike_maps = [
            single_frame_spikes(values[i], uncs[i], valid[i]).ravel() for i in idx.tolist()
        ]
        spikes = np.concatenate(spike_maps)[
            samples.pixel + np.cumsum([0] + [m.size for m in spike_maps[:-1]])[samples.frame]
        ]
        rejected, _median = find_outliers(
            samples,
            grid_shape=grid.shape,
            sigma=outlier_sigma,
            frac=outlier_frac,
            min_coverage=min_coverage,
            spikes=spikes,
        )
        rej_frame = samples.frame[rejected]
        rej_pixel = samples.pixel[rejected]
        counts = np.bincount(rej_frame, minlength=idx.size)
        for j in np.flatnonzero(counts):
            i = int(idx[j])
            rmasks[i].ravel()[rej_pixel[rej_frame == j]] = int(mips.MaskBit.OUTLIER)
            outliers_per_frame[i] = int(counts[j])
        samples = samples.select(~rejected)

    if weighting == "frame":
        frame_w = np.array(
            [1.0 / float(np.median(uncs[i][valid[i]].astype(np.float64) ** 2)) for i in idx]
        )
        weight = frame_w[samples.frame]
    elif weighting == "pixel":
        weight = 1.0 / samples.unc.astype(np.float64) ** 2
    else:
        raise MosaicError(f"weighting must be 'frame' or 'pixel', got {weighting!r}")
    sums = drizzle(samples, grid, sample_weight=weight, pixfrac=pixfrac)
    covered = sums.weight > 0
    safe_w = np.where(covered, sums.weight, 1.0)
    image = np.where(covered, sums.weighted_value / safe_w, np.nan)
    unc = np.where(covered, np.sqrt(sums.weighted_var) / safe_w, np.nan)

    offsets_all = np.full(n, np.nan)
    offsets_all[idx] = offsets
    header = grid.header()
    header["BUNIT"] = (bunit or "MJy/sr", "unit of the image")
    return Mosaic(
        image=image.reshape(grid.shape).astype(np.float32),
        unc=unc.reshape(grid.shape).astype(np.float32),
        coverage=sums.coverage.reshape(grid.shape).astype(np.float32),
        header=header,
        offsets_mjysr=offsets_all,
        rmasks=tuple(rmasks),
        used=used,
        outliers_per_frame=outliers_per_frame,
        unc_scale=unc_scale,
        frame_keys=keys,
        notes=tuple(notes),
        pixel_arcsec=grid.pixel_arcsec,
        bunit=bunit or "MJy/sr",
        flat=flat,
        parameters={
            "pixel_arcsec": grid.pixel_arcsec,
            "fatal_bits": int(fatal_bits),
            "drop_first_dce": drop_first_dce,
            "self_flat": self_flat,
            "match_background": match_background,
            "outlier_sigma": outlier_sigma,
            "outlier_frac": outlier_frac,
            "min_coverage": min_coverage,
            "weighting": weighting,
            "pixfrac": pixfrac,
        },
    )
