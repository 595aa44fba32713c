"""Spitzer MIPS: arrays, bands, calibration constants, mask bits, distortion and product names.

The one place where MIPS facts live (see `../shared/SCIENCE_NOTES.md` of the kit and the seeds):
the simulator, decode, calibrate, mosaic and extract all read them from here. Values the
handbooks do not confirm are marked as such and are parameters of the functions that use them.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import numpy as np

TELESCOP = "Spitzer"
INSTRUME = "MIPS"
#: Spitzer's primary mirror diameter (m): lambda/D at 23.68 um is 5.75", and the Airy core's
#: FWHM (~1.03 lambda/D) the handbook's 5.9".
TELESCOPE_DIAMETER_M = 0.85

#: Seconds per 24 um sample (one "read" of the Si:As array).
SI_SAMPLE_S = 0.524288
#: Ge ramps are sampled at 8 samples per second per pixel.
GE_SAMPLE_RATE_HZ = 8.0
#: Steradians per square arcsecond (used for MJy/sr <-> uJy per pixel).
SR_PER_ARCSEC2 = 1.0 / 4.254517e10


@dataclass(frozen=True, slots=True)
class MipsBand:
    """One MIPS imaging channel: array geometry, optics and calibration."""

    channel: int  #: CHNLNUM: 1, 2, 3
    name: str  #: "24um", "70um", "160um"
    wavelength_um: float  #: effective wavelength
    nrows: int  #: array rows (NAXIS2)
    ncols: int  #: array columns (NAXIS1)
    pixel_arcsec: float  #: native pixel scale
    psf_fwhm_arcsec: float
    fluxconv: float  #: MJy/sr per DN/s (24 um) or per instrument unit (Ge)
    fluxconv_unc_frac: float
    mosaic_pixel_arcsec: float  #: default post-BCD pixel
    vega_zero_jy: float  #: flux density of a zero-magnitude star (MIPS handbook)
    #: (aperture radius ", inner sky ", outer sky ", correction) for infinite-aperture calibration
    aperture_corrections: tuple[tuple[float, float, float, float], ...]
    detector: str  #: "Si:As" or "Ge:Ga"
    #: Background mesh cell (arcsec) for point-source extraction on this band's mosaics, when
    #: the extractor's default (16 FWHM) would be larger than one frame's usable short side:
    #: the cell must follow frame-scale structure (per-frame offset and responsivity
    #: residuals on a bright sky), which otherwise adds noise on the PSF's scale. None: default.
    background_box_arcsec: float | None = None

    @property
    def ujy_per_mjysr_mosaic_pixel(self) -> float:
        """uJy in one default mosaic pixel for a surface brightness of 1 MJy/sr (seed 001)."""
        return 1e12 * SR_PER_ARCSEC2 * self.mosaic_pixel_arcsec**2

    @property
    def lambda_over_d_arcsec(self) -> float:
        """The diffraction scale lambda / D of this band (arcsec)."""
        return self.wavelength_um * 1e-6 / TELESCOPE_DIAMETER_M * 206264.806

    def ujy_per_mjysr(self, pixel_arcsec: float) -> float:
        """uJy in one pixel of side `pixel_arcsec` for 1 MJy/sr."""
        return 1e12 * SR_PER_ARCSEC2 * pixel_arcsec**2


BANDS: dict[int, MipsBand] = {
    1: MipsBand(
        channel=1,
        name="24um",
        wavelength_um=23.68,
        nrows=128,
        ncols=128,
        pixel_arcsec=2.55,
        psf_fwhm_arcsec=5.9,
        fluxconv=0.0454,
        fluxconv_unc_frac=0.02,
        mosaic_pixel_arcsec=2.45,
        vega_zero_jy=7.17,
        aperture_corrections=(
            (3.5, 0.0, 0.0, 2.56),
            (7.0, 0.0, 0.0, 1.61),
            (13.0, 0.0, 0.0, 1.16),
            (20.0, 0.0, 0.0, 1.12),
            (35.0, 40.0, 50.0, 1.082),
        ),
        detector="Si:As",
    ),
    2: MipsBand(
        channel=2,
        name="70um",
        wavelength_um=71.42,
        nrows=32,
        ncols=32,
        pixel_arcsec=9.98,
        psf_fwhm_arcsec=18.0,
        fluxconv=702.0,  # unconfirmed in the handbooks: a parameter, not a fact
        fluxconv_unc_frac=0.07,
        mosaic_pixel_arcsec=4.0,
        vega_zero_jy=0.778,
        aperture_corrections=((35.0, 39.0, 65.0, 1.22),),
        detector="Ge:Ga",
        background_box_arcsec=160.0,  # the usable half: 16 rows of 9.98"
    ),
    3: MipsBand(
        channel=3,
        name="160um",
        wavelength_um=155.9,
        nrows=2,
        ncols=20,
        pixel_arcsec=16.0,
        psf_fwhm_arcsec=38.0,
        fluxconv=41.7,
        fluxconv_unc_frac=0.12,
        mosaic_pixel_arcsec=8.0,
        vega_zero_jy=0.159,
        aperture_corrections=((24.0, 64.0, 128.0, 2.603),),
        detector="Ge:Ga",
    ),
}

def band_named(name: str) -> MipsBand | None:
    """The MIPS band called `name` ("24um", "70um", "160um"; case and spaces ignored)."""
    key = name.strip().lower()
    return next((band for band in BANDS.values() if band.name.lower() == key), None)


#: The 70 um array: only half A (32 columns x 16 rows) is usable; rows 16..31 are the bad half.
MIPS70_GOOD_ROWS = slice(0, 16)

#: 24 um on-board saturation: above about this surface brightness the slope is replaced by the
#: first difference (SCIENCE_NOTES); in DN/s this is 63 / fluxconv.
MIPS24_SATURATION_MJYSR = 63.0


class MaskBit(enum.IntFlag):
    """Bits of the per-DCE status mask (`bbmsk` at 24 um, `bmask` for Ge), 16-bit.

    Bits 9..15 follow the SSC MIPS-24 layout; bits 0..8 are skybus's own (the SSC layout of
    those bits could not be confirmed).
    """

    FIRST_DCE = 1 << 0  #: DCENUM 0 (first-frame effect): response corrected, flagged
    EARLY_DCE = 1 << 1  #: DCENUM 1..2 (~2% depressed): response corrected, flagged
    SATURATED_FROM_DIFF = 1 << 2  #: slope replaced by the first-difference estimate
    RAMP_JUMP = 1 << 3  #: Ge: cosmic-ray jump removed from the ramp fit
    NO_STIM = 1 << 4  #: Ge: responsivity not tracked by stim (nearest-in-time used)
    BAD_HALF = 1 << 5  #: 70 um bad half of the array
    NO_CALIBRATION = 1 << 6  #: dark or flat missing for this pixel
    OUTLIER = 1 << 7  #: rmask: outlier found in post-BCD processing
    RESERVED_8 = 1 << 8
    RADHIT = 1 << 9  #: radiation hit (cosmic ray) detected
    UNC_STATUS = 1 << 10  #: uncertainty status: uncertainty could not be computed
    PMASK = 1 << 11  #: masked in pmask (static bad pixel)
    NONLIN_NOT_COMPUTED = 1 << 12
    SOFT_SATURATED = 1 << 13
    MISSING = 1 << 14  #: data missing in downlink
    SIGN = 1 << 15


#: Default fatal bits for mosaicking and photometry: pixels with these bits carry no flux.
FATAL_BITS = int(
    MaskBit.PMASK | MaskBit.MISSING | MaskBit.RADHIT | MaskBit.BAD_HALF | MaskBit.UNC_STATUS
)

#: Ge pmask bits (SCIENCE_NOTES): 2 noisy, 3 bad nonlinearity, 8 bad half of 70 um, 14 bad pixel.
GE_PMASK_NOISY = 1 << 2
GE_PMASK_BAD_NONLIN = 1 << 3
GE_PMASK_BAD_HALF = 1 << 8
GE_PMASK_BAD_PIXEL = 1 << 14


# --- distortion -------------------------------------------------------------------------
# The optical distortion of each array as SIP polynomials (pixel offsets u, v from CRPIX in
# pixels). The coefficients model a mild field curvature: ~0.3 px at the 24 um array corners.
# They are the instrument team's calibration; the simulator applies the same as its truth.

_SIP_FORWARD: dict[int, dict[str, float]] = {
    1: {
        "A_2_0": 1.2e-5,
        "A_1_1": -6.0e-6,
        "A_0_2": 4.0e-6,
        "A_3_0": -2.0e-8,
        "B_2_0": -5.0e-6,
        "B_1_1": 9.0e-6,
        "B_0_2": 1.0e-5,
        "B_0_3": 1.5e-8,
    },
    2: {"A_2_0": 6.0e-5, "A_0_2": 3.0e-5, "B_1_1": 5.0e-5, "B_0_2": -2.0e-5},
    3: {"A_2_0": 1.0e-4, "B_0_2": 1.0e-4},
}
SIP_ORDER = 3


def _sip_eval(coeffs: dict[str, float], prefix: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u, dtype=float)
    for name, value in coeffs.items():
        if name.startswith(prefix + "_"):
            p, q = (int(s) for s in name.split("_")[1:])
            out += value * u**p * v**q
    return out


@functools.cache
def sip_coefficients(channel: int) -> dict[str, float]:
    """Forward (A, B) and inverse (AP, BP) SIP coefficients of a channel, order `SIP_ORDER`.

    The inverse is a least-squares fit over the array, accurate to < 1e-4 px.
    """
    band = BANDS[channel]
    fwd = _SIP_FORWARD[channel]
    ny, nx = band.nrows, band.ncols
    crpix1, crpix2 = (nx + 1) / 2.0, (ny + 1) / 2.0
    yy, xx = np.mgrid[-2 : ny + 2 : 0.5, -2 : nx + 2 : 0.5]
    u = (xx + 1 - crpix1).ravel()
    v = (yy + 1 - crpix2).ravel()
    uu = u + _sip_eval(fwd, "A", u, v)
    vv = v + _sip_eval(fwd, "B", u, v)
    terms = [(p, q) for p in range(SIP_ORDER + 1) for q in range(SIP_ORDER + 1 - p) if p + q >= 1]
    design = np.stack([uu**p * vv**q for p, q in terms], axis=1)
    ap, *_ = np.linalg.lstsq(design, u - uu, rcond=None)
    bp, *_ = np.linalg.lstsq(design, v - vv, rcond=None)
    out = dict(fwd)
    for (p, q), a, b in zip(terms, ap, bp, strict=True):
        out[f"AP_{p}_{q}"] = float(a)
        out[f"BP_{p}_{q}"] = float(b)
    return out


def wcs_keywords(
    channel: int, *, ra_deg: float, dec_deg: float, pa_deg: float
) -> dict[str, float | int | str]:
    """TAN-SIP WCS keywords of one DCE whose array centre points at (ra, dec).

    `pa_deg` is the position angle of the array's +y axis, east of north (Spitzer's PA).
    """
    band = BANDS[channel]
    scale = band.pixel_arcsec / 3600.0
    pa = math.radians(pa_deg)
    # +x points west of north for PA=0 (RA increases to the left, as on the sky).
    cd = (
        -scale * math.cos(pa),
        scale * math.sin(pa),
        scale * math.sin(pa),
        scale * math.cos(pa),
    )
    kw: dict[str, float | int | str] = {
        "WCSAXES": 2,
        "CTYPE1": "RA---TAN-SIP",
        "CTYPE2": "DEC--TAN-SIP",
        "CRPIX1": (band.ncols + 1) / 2.0,
        "CRPIX2": (band.nrows + 1) / 2.0,
        "CRVAL1": float(ra_deg % 360.0),
        "CRVAL2": float(dec_deg),
        "CD1_1": cd[0],
        "CD1_2": cd[1],
        "CD2_1": cd[2],
        "CD2_2": cd[3],
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "RADESYS": "ICRS",
        "A_ORDER": SIP_ORDER,
        "B_ORDER": SIP_ORDER,
        "AP_ORDER": SIP_ORDER,
        "BP_ORDER": SIP_ORDER,
        "PXSCAL1": -band.pixel_arcsec,
        "PXSCAL2": band.pixel_arcsec,
        "PA": float(pa_deg),
    }
    kw.update(sip_coefficients(channel))
    return kw


# --- names ------------------------------------------------------------------------------


def bcd_name(channel: int, aorkey: int, expid: int, dcenum: int, version: int, kind: str) -> str:
    """Spitzer per-DCE name, e.g. `SPITZER_M1_12345678_0004_0002_1_bcd.fits`.

    `kind` is the product type: raw, bcd, bunc, bbmsk, bmask, fbcd, ebcd, brmsk.
    """
    return f"SPITZER_M{channel}_{aorkey}_{expid:04d}_{dcenum:04d}_{version}_{kind}.fits"


def pbcd_name(
    channel: int,
    aorkey: int,
    expid: int,
    version: int,
    ensemble: int,
    kind: str,
    suffix: str = "fits",
) -> str:
    """Spitzer post-BCD name, e.g. `SPITZER_M1_12345678_0000_1_E7654321_maic.fits`."""
    return f"SPITZER_M{channel}_{aorkey}_{expid:04d}_{version}_E{ensemble}_{kind}.{suffix}"
