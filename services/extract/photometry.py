"""Point-source photometry of a mosaic: APEX-like extraction, apertures, Vega magnitudes."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from services.extract.background import estimate_background
from services.extract.detect import (
    Detections,
    find_peaks,
    grow_mask,
    matched_filter,
    position_noise_scale,
    refilter,
)
from services.extract.jit import kernel
from services.extract.prf import (
    PrfFit,
    TabulatedPrf,
    fit_common_fwhm,
    fit_point_sources,
    sigma_from_fwhm,
)
from services.extract.prfmodel import PrfChoice, choose_prf, wing_image
from shared import fitsio
from shared.instruments import mips

#: uJy per (MJy/sr x arcsec^2): 1 MJy/sr = 1e12 uJy / 4.254517e10 arcsec^2 (seed 001).
UJY_PER_MJYSR_ARCSEC2 = 1e12 * mips.SR_PER_ARCSEC2
#: 2.5 / ln(10): magnitude error per fractional flux error.
_MAG_PER_FRAC = 2.5 / math.log(10.0)
#: PRF mismatch (fraction of a source's model, see `_prf_mismatch`) above which the residual
#: pass counts it as noise: 1%, far above what a matching model leaves (0 on the simulated
#: MIPS mosaics), far below an undersampled PSF fitted with a Gaussian (4% for IRAC-like data).
MIN_PRF_MISMATCH = 0.01
#: Smallest flux of a residual-pass source relative to a fitted source within 3 FWHM
#: (SExtractor's DEBLEND_MINCONT): fainter residual peaks there are the PRF's imperfection.
MIN_RESIDUAL_CONTRAST = 0.005
#: Largest relative difference between the detection filter's FWHM (the first guess) and the
#: measured one at which the detection pass is kept; above it the image is filtered again.
MAX_FILTER_MISMATCH = 0.15


class ExtractionError(ValueError):
    """The inputs of a source extraction are inconsistent or unusable."""


def pixel_scale_arcsec(header: fits.Header | Mapping[str, object]) -> float:
    """Geometric-mean pixel side (arcsec) of a celestial WCS header."""
    return wcs_pixel_scale_arcsec(_celestial_wcs(header))


def _celestial_wcs(header: fits.Header | Mapping[str, object]) -> WCS:
    """The celestial WCS of a header (its WCS keywords only: built once per extraction).

    A new object every call (the caller may modify it), copied from a parse cached by the WCS
    cards' text: parsing costs ~20x a copy, and a pipeline extracts many products that share
    one mosaic WCS.
    """
    full = fits.Header(header) if not isinstance(header, fits.Header) else header
    return _parsed_celestial_wcs(fitsio.wcs_cards(full).tostring()).deepcopy()


@functools.lru_cache(maxsize=32)
def _parsed_celestial_wcs(cards: str) -> WCS:
    """`_celestial_wcs` of the header whose WCS cards are `cards` (FITS text). The cached object
    is shared: it is only ever copied, never used or modified."""
    wcs = WCS(fits.Header.fromstring(cards), naxis=2)
    if not wcs.has_celestial:
        raise ExtractionError("header has no celestial WCS: CTYPE1/2, CRVAL, CD or CDELT needed")
    if wcs.naxis == 2 and (wcs.wcs.lng, wcs.wcs.lat) == (0, 1):
        return wcs  # already its own celestial part (`.celestial` would build a copy)
    return wcs.celestial


def wcs_pixel_scale_arcsec(wcs: WCS) -> float:
    """Geometric-mean pixel side (arcsec) of a celestial WCS."""
    scales = proj_plane_pixel_scales(wcs) * 3600.0
    return float(math.sqrt(abs(scales[0] * scales[1])))


def mips_band(header: Mapping[str, object], band_name: str) -> mips.MipsBand | None:
    """The MIPS band of a MIPS product (INSTRUME='MIPS'), by CHNLNUM or by `band_name`."""
    if str(header.get("INSTRUME", "")).strip().upper() != "MIPS":
        return None
    chnl = header.get("CHNLNUM")
    if isinstance(chnl, int | np.integer) and int(chnl) in mips.BANDS:
        return mips.BANDS[int(chnl)]
    return mips.band_named(band_name)


def gaussian_aperture_correction(
    *, fwhm_arcsec: float, radius_arcsec: float, pixel_arcsec: float
) -> float:
    """Infinite-aperture correction (total / enclosed) of a pixel-integrated Gaussian PSF.

    For a Gaussian of sigma s, enclosed fraction = 1 - exp(-r^2 / 2 s^2); pixel integration adds
    a 1-pixel box, approximated by s^2 + p^2/12. Use the band's measured corrections for real
    MIPS PSFs (`mips.BANDS[ch].aperture_corrections`); this is for Gaussian-like PSFs.
    """
    s2 = sigma_from_fwhm(fwhm_arcsec) ** 2 + pixel_arcsec**2 / 12.0
    frac = 1.0 - math.exp(-(radius_arcsec**2) / (2.0 * s2))
    return 1.0 / frac


def prf_enclosed_fraction(prf: TabulatedPrf, radius_px: float) -> float:
    """Fraction of a tabulated PRF's total flux in an exact-overlap circular aperture of
    `radius_px` (`aperture_fluxes` on the PRF itself), averaged over sub-pixel source
    positions (1 / the aperture correction)."""
    h = math.ceil(radius_px) + 1
    pix = np.arange(2 * h + 1, dtype=float)
    fractions = []
    for px, py in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5), (0.25, 0.25)):
        stamp = prf.values(pix[None, :] - (h + px), pix[:, None] - (h + py))
        inside, _ = aperture_fluxes(stamp, np.zeros_like(stamp), x=np.array([h + px]),
                                    y=np.array([h + py]), radius_px=radius_px)
        fractions.append(float(inside[0]))
    return float(np.mean(fractions))


def vega_magnitude(
    flux_ujy: np.ndarray, flux_err_ujy: np.ndarray, *, vega_zero_jy: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vega magnitudes m = 2.5 log10(f0 / f) and their 1-sigma errors; NaN where f <= 0."""
    f = np.asarray(flux_ujy, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(f > 0, 2.5 * np.log10(vega_zero_jy * 1e6 / f), np.nan)
        dmag = np.where(f > 0, _MAG_PER_FRAC * np.asarray(flux_err_ujy) / f, np.nan)
    return mag, dmag


def aperture_fluxes(
    image: np.ndarray,
    unc: np.ndarray,
    *,
    x: np.ndarray,
    y: np.ndarray,
    radius_px: float,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact-overlap circular-aperture sums (image unit x pixel) and their 1-sigma errors.

    `image` must be background-subtracted; `unc` is the per-pixel 1-sigma uncertainty;
    masked pixels (True) contribute nothing. Positions are 0-based pixels. Each pixel counts
    with the exact area of its overlap with the circle (as photutils' method='exact'), the
    variance with the same weights (`_aperture_sums`, compiled).
    """
    xs = np.asarray(x, dtype=float).ravel()
    ys = np.asarray(y, dtype=float).ravel()
    if xs.size == 0:
        return np.zeros(0), np.zeros(0)
    bad = (np.zeros((0, 0), dtype=bool) if mask is None
           else np.ascontiguousarray(mask, dtype=bool))
    return _aperture_sums(
        np.require(image, dtype=np.float64, requirements=["C", "W"]),
        np.require(unc, dtype=np.float64, requirements=["C", "W"]), bad, xs, ys,
        np.round(xs).astype(np.int64), np.round(ys).astype(np.int64), float(radius_px))


@kernel
def _quadrant_area(u: float, v: float, r: float) -> float:
    """Signed area of the circle of radius r (centre at the origin) within [0, u] x [0, v]
    (odd in u and in v): past the circle's edge, the rectangle up to where row v meets the
    circle, plus the circular segment from there to u (integral of sqrt(r^2 - t^2))."""
    a = min(abs(u), r)
    b = min(abs(v), r)
    lo = min(math.sqrt(max(r * r - b * b, 0.0)), a)
    prim_a = 0.5 * (a * math.sqrt(max(r * r - a * a, 0.0)) + r * r * math.asin(a / r))
    prim_lo = 0.5 * (lo * math.sqrt(max(r * r - lo * lo, 0.0)) + r * r * math.asin(lo / r))
    return np.sign(u) * np.sign(v) * (lo * b + prim_a - prim_lo)


@kernel
def _aperture_sums(image: np.ndarray, unc: np.ndarray, bad: np.ndarray, xs: np.ndarray,
                   ys: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                   r: float) -> tuple[np.ndarray, np.ndarray]:
    """`aperture_fluxes` on the stamps of half-size ceil(r) + 1 around (cx, cy): each pixel's
    overlap with the circle by inclusion-exclusion of `_quadrant_area` at its corners (each
    corner evaluated once); NaN for an aperture that overlaps no pixel of the image."""
    ny, nx = image.shape
    masked = bad.size > 0
    h = math.ceil(r) + 1
    side = 2 * h + 1
    q = np.empty((side + 1, side + 1))
    ap_sum = np.zeros(xs.size)
    ap_err = np.zeros(xs.size)
    for s in range(xs.size):
        for i in range(side + 1):
            ey = cy[s] - h + i - ys[s] - 0.5
            for j in range(side + 1):
                q[i, j] = _quadrant_area(cx[s] - h + j - xs[s] - 0.5, ey, r)
        total = 0.0
        var = 0.0
        overlap = False
        for i in range(side):
            py = cy[s] - h + i
            if py < 0 or py >= ny:
                continue
            for j in range(side):
                px = cx[s] - h + j
                if px < 0 or px >= nx:
                    continue
                area = max(q[i + 1, j + 1] - q[i, j + 1] - q[i + 1, j] + q[i, j], 0.0)
                if area <= 0.0:
                    continue
                overlap = True
                if masked and bad[py, px]:
                    continue
                total += area * image[py, px]
                var += area * unc[py, px] ** 2
        ap_sum[s] = total if overlap else np.nan  # as photutils: no overlap, no value
        ap_err[s] = math.sqrt(var) if overlap else np.nan
    return ap_sum, ap_err


def estimate_fwhm_px(
    image: np.ndarray,
    weight: np.ndarray,
    *,
    guess_px: float = 2.5,
    n_sources: int = 30,
    grid: np.ndarray | None = None,
    peaks: Detections | None = None,
) -> float:
    """FWHM (pixels) of the point sources in a background-subtracted image.

    The brightest isolated peaks (S/N > 20, up to `n_sources`) are PRF-fitted together with one
    FWHM common to all (each source's flux and position free): the FWHM minimising the total
    chi^2, bounded to 0.4-2.5 x `guess_px`, after dropping sources that fit > 5x worse than the
    median (blends). With `grid` (trial FWHMs), the chi^2 is instead
    evaluated at each trial and its minimum located by a parabola through the best three.
    `peaks`: the image's detections from a matched filter of `guess_px` (e.g. the extraction's
    own detection pass, sorted by S/N), used instead of filtering the image again.
    Raises `ExtractionError` when no source is bright enough.
    """
    lo_hi = (0.4 * guess_px, 2.5 * guess_px)
    trials = np.asarray(grid if grid is not None else np.geomspace(*lo_hi, 15))
    border = int(3 * guess_px)
    if peaks is None:
        # Only the S/N > 20 cut uses the calibration here: a ninth of the pixels is plenty.
        mf = matched_filter(image, weight, fwhm_px=guess_px, calibration_step=3)
        det = find_peaks(mf, threshold=20.0, valid=weight > 0, exclude_border_px=border,
                         segments=False)
    else:
        # The same peaks: local maxima are local maxima at any threshold.
        ny, nx = image.shape
        lo_x, lo_y = max(1, border), max(1, border)
        keep = ((peaks.snr >= 20.0) & (peaks.x >= lo_x - 0.5) & (peaks.x < nx - lo_x - 0.5)
                & (peaks.y >= lo_y - 0.5) & (peaks.y < ny - lo_y - 0.5))
        det = peaks.subset(keep)
    if det.x.size == 0:
        raise ExtractionError("no source above S/N 20 to measure the PSF FWHM: pass fwhm_arcsec")
    # Isolated: no other detection within 4 guess FWHM.
    from scipy.spatial import cKDTree

    pos = np.column_stack([det.x, det.y])
    d, _ = cKDTree(pos).query(pos, k=2)
    iso = d[:, 1] > 4.0 * guess_px if len(pos) > 1 else np.ones(1, dtype=bool)
    pick = np.flatnonzero(iso)[:n_sources]
    if pick.size == 0:
        pick = np.arange(min(n_sources, det.x.size))
    # A common stamp for every FWHM so that the chi^2 values compare like with like.
    half_size = math.ceil(1.5 * trials.max())
    if grid is None:
        return fit_common_fwhm(
            image,
            weight,
            x0=det.x[pick],
            y0=det.y[pick],
            flux0=det.flux[pick],
            fwhm_px=guess_px,
            half_size=half_size,
            fwhm_range=lo_hi,
            reject_factor=5.0,
        )
    chi2 = np.empty(trials.size)
    for k, fwhm in enumerate(trials):
        fit = fit_point_sources(
            image,
            weight,
            x0=det.x[pick],
            y0=det.y[pick],
            flux0=det.flux[pick],
            fwhm_px=float(fwhm),
            half_size=half_size,
            max_iter=10,
        )
        chi2[k] = float(np.sum(fit.chi2))
    k = int(np.argmin(chi2))
    if 0 < k < trials.size - 1:
        lx = np.log(trials[k - 1 : k + 2])
        c = np.polyfit(lx, chi2[k - 1 : k + 2], 2)
        if c[0] > 0:
            return float(np.exp(-c[1] / (2 * c[0])))
    return float(trials[k])


def extract_sources(
    image: np.ndarray,
    unc: np.ndarray | None,
    coverage: np.ndarray | None,
    header: fits.Header,
    *,
    fwhm_arcsec: float | None,
    band_name: str,
    aperture_radius_arcsec: float | None = None,
    aperture_correction: float | None = None,
    vega_zero_jy: float | None = None,
    detect_sigma: float = 5.0,
    background_box_arcsec: float | None = None,
    fit_half_size_px: int | None = None,
    calibrate_unc: bool = True,
    residual_pass: bool = True,
    subtract_neighbours: bool = True,
    mask_sources_in_background: bool = False,
    band_aperture_table: bool = False,
    prf_model: str | TabulatedPrf = "auto",
) -> Table:
    """APEX-like point-source extraction from a mosaic (image and unc in MJy/sr).

    Steps: mesh background (clipped mode, median-filtered, bicubic) and background RMS;
    PSF-matched filter S/N map (optimal weights 1/unc^2), with the unc map calibrated against the
    actual background noise (the filter of the first-guess FWHM, whose peaks also give the FWHM
    measurement; filtered again when the measured FWHM differs by more than
    `MAX_FILTER_MISMATCH`); peaks above `detect_sigma` with segmentation (peaks sharing a
    segment are deblended); joint PRF fit (pixel-integrated Gaussian of the band FWHM: flux and
    position of all sources together, blends simultaneously); optionally a second detection
    pass on the residual image to recover sources hidden in the wings of brighter ones;
    exact-overlap aperture photometry corrected to infinite aperture (with
    `subtract_neighbours`, on the image minus the fitted models of all other sources);
    Vega magnitudes.

    FWHM: `fwhm_arcsec` if given, else measured from the image's bright isolated sources (for
    MIPS products seeded by the band FWHM, which is used when no source is bright enough).
    Aperture: `aperture_radius_arcsec` (default 1.2 FWHM) with `aperture_correction` (default:
    the correction of the PRF model actually fitted, a pixel-integrated Gaussian of the FWHM
    used, so aperture and PRF fluxes refer to the same PSF; the band's tabulated corrections,
    measured on the real MIPS PSF, only with `band_aperture_table=True`, i.e. when the data's
    PSF is the real MIPS one and the radius matches a tabulated one). `unc` may be None: the
    background RMS map is used instead.
    Background cell: `background_box_arcsec`, else 16 FWHM (fewer on small images) but at most
    the MIPS band's `background_box_arcsec` (70 um: the usable array's short side).
    PRF: with `prf_model="auto"` the pixel-integrated Gaussian unless the bright isolated
    sources are fitted significantly better by the telescope's diffraction pattern (an obscured
    Airy pattern, `prfmodel.choose_prf`); "gaussian" forces the Gaussian; a `TabulatedPrf`
    (e.g. read from a PRF file) is used as given. With a tabulated PRF its wings beyond the
    fitting stamps (the outer rings of bright sources) are subtracted and the sources fitted
    again, and the aperture correction is the PRF's own.
    `vega_zero_jy` defaults to the MIPS band's zero point (magnitudes
    are NaN when there is none). `coverage` (frames per pixel) may be None; pixels with zero
    coverage, non-finite values or unc <= 0 are ignored.

    Returns an astropy Table, one row per source, columns with units: fluxes in uJy, positions
    in degrees with uncertainties in arcsec (delta_RA is along RA*cos(Dec)), x/y 0-based pixels,
    bckgrnd in MJy/sr. `meta` holds BAND, FWHM (arcsec), APRAD (arcsec), APCORR, PIXSCAL
    (arcsec), UJYPPIX (uJy per MJy/sr per pixel), UNCSCALE (unc calibration factor of fluxes),
    POSSCALE (of positions, see `position_noise_scale`), NSIGDET.
    Raises `ExtractionError` for inconsistent inputs.
    """
    img = np.asarray(image, dtype=float)
    if unc is None:
        # No uncertainty map: the background RMS map stands in for it (white-noise estimate).
        pre = np.isfinite(img) & (coverage is None or np.asarray(coverage) > 0)
        _, rms0 = estimate_background(img, mask=~pre, box_px=_default_box(3.0, img.shape))
        err = np.where(rms0 > 0, rms0, np.nan)
    else:
        err = np.asarray(unc, dtype=float)
    if img.ndim != 2 or err.shape != img.shape:
        raise ExtractionError(
            f"image and unc must be 2-D arrays of one shape, got {img.shape} and {err.shape}"
        )
    cov = None if coverage is None else np.asarray(coverage, dtype=float)
    if cov is not None and cov.shape != img.shape:
        raise ExtractionError(f"coverage shape {cov.shape} differs from image shape {img.shape}")
    wcs = _celestial_wcs(header)
    pix_arcsec = wcs_pixel_scale_arcsec(wcs)
    ujy_per_pix = UJY_PER_MJYSR_ARCSEC2 * pix_arcsec**2
    band = mips_band(header, band_name)

    valid = np.isfinite(img) & np.isfinite(err) & (err > 0)
    if cov is not None:
        valid &= np.isfinite(cov) & (cov > 0)
    if not np.any(valid):
        raise ExtractionError("no usable pixel: image, unc or coverage are all invalid/zero")
    weight = np.zeros_like(img)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # 1 / err^2 in place (np.square(err) would be one more image-sized temporary).
        np.multiply(err, err, out=weight, where=valid)
        np.divide(1.0, weight, out=weight, where=valid)

    if fwhm_arcsec is not None:
        fwhm_src = "parameter"
        fwhm_px = float(fwhm_arcsec) / pix_arcsec
    elif band is not None:
        fwhm_src = "MIPS band"
        fwhm_px = band.psf_fwhm_arcsec / pix_arcsec
    else:
        fwhm_src = "measured"
        fwhm_px = float("nan")
    box_px = round(background_box_arcsec / pix_arcsec) if background_box_arcsec else 0
    # The band's cell is an upper bound on the default (frame-scale structure must be followed).
    band_box_px = (round(band.background_box_arcsec / pix_arcsec)
                   if band is not None and band.background_box_arcsec else 0)

    guess_px = fwhm_px if math.isfinite(fwhm_px) else 3.0
    box = box_px or min(_default_box(guess_px, img.shape), band_box_px or img.size)
    invalid = ~valid
    bkg, rms = estimate_background(img, mask=invalid, box_px=box)
    sub = _masked_difference(img, bkg, valid)
    # Detection filter of the first-guess FWHM; its peaks also serve the FWHM measurement.
    mf_fwhm_px = guess_px
    mf = matched_filter(sub, weight, fwhm_px=guess_px, calibrate=calibrate_unc)
    det = find_peaks(mf, threshold=detect_sigma, valid=valid)
    if fwhm_src == "MIPS band":
        # The band FWHM is the optics' PSF; the mosaic's point response is broader (native
        # pixel and resampling kernel convolved in, ~9% at 24 um), and a PRF narrower than the
        # data biases PRF fluxes low by several per cent. Measure it, seeded by the band value.
        try:
            fwhm_px = estimate_fwhm_px(sub, weight, guess_px=fwhm_px, peaks=det)
            fwhm_src = "measured (MIPS band seed)"
        except ExtractionError:
            pass  # no bright source: the band FWHM is the best available
    elif not math.isfinite(fwhm_px):
        fwhm_px = estimate_fwhm_px(sub, weight, guess_px=guess_px, peaks=det)
        if not box_px:
            box = _default_box(fwhm_px, img.shape)
    # A filter within 15% of the PSF's width keeps > 99% of the matched filter's S/N
    # (2 a / (1 + a^2) for a width ratio a); a worse guess is filtered again.
    refilter_needed = abs(fwhm_px / guess_px - 1.0) > MAX_FILTER_MISMATCH
    if mask_sources_in_background:
        # Second pass with >5 sigma sources masked. Off by default: on a sloped sky the masked
        # cells' levels are taken off-centre, which costs more than the sources' bias, which
        # the clipped mode already removes.
        mf = matched_filter(sub, weight, fwhm_px=fwhm_px, calibrate=False)
        srcmask = grow_mask(mf.snr > 5.0, 2 * max(1, round(1.5 * fwhm_px)) + 1)
        bkg, rms = estimate_background(img, mask=invalid | srcmask, box_px=box)
        sub = _masked_difference(img, bkg, valid)
        refilter_needed = True
    if refilter_needed:
        mf_fwhm_px = fwhm_px
        mf = matched_filter(sub, weight, fwhm_px=fwhm_px, calibrate=calibrate_unc)
        det = find_peaks(mf, threshold=detect_sigma, valid=valid)
    uscale = mf.noise_scale
    weight_cal = weight / uscale**2
    # The calibrated 1-sigma map, 0 where invalid (the apertures' masked pixels).
    err_cal = np.zeros_like(err)
    np.multiply(err, uscale, out=err_cal, where=valid)

    choice: PrfChoice | None = None
    prf: TabulatedPrf | None = None
    optics_lod_px = band.lambda_over_d_arcsec / pix_arcsec if band else None
    if isinstance(prf_model, TabulatedPrf):
        prf = prf_model
    elif prf_model == "auto":
        if det.x.size:
            choice = choose_prf(sub, weight_cal, x=det.x, y=det.y, flux=det.flux, snr=det.snr,
                                fwhm_px=fwhm_px, lambda_over_d_px=optics_lod_px)
            prf = choice.prf
    elif prf_model != "gaussian":
        raise ExtractionError(
            f"prf_model must be 'auto', 'gaussian' or a TabulatedPrf, got {prf_model!r}")
    data = sub  # what the PRF fits see: with a tabulated PRF, minus the sources' far wings

    def fit_sources(x0: np.ndarray, y0: np.ndarray, f0: np.ndarray,
                    free: np.ndarray | None = None) -> PrfFit:
        return fit_point_sources(data, weight_cal, x0=x0, y0=y0, flux0=f0, fwhm_px=fwhm_px,
                                 half_size=fit_half_size_px, free=free, prf=prf)

    fit = fit_sources(det.x, det.y, det.flux)
    if prf is not None and fit.x.size:
        # The rings beyond the fitting stamps (a neighbour's, and a bright source's own) are
        # subtracted, then every source fitted again: its stamp then holds only light that
        # the fit models, and a piece of a bright source's ring, detected as a source, is
        # left with ~0 flux. The refit starts from the fitted positions, on whose stamps the
        # wings were cut.
        core = int(fit_half_size_px or max(2, math.ceil(1.5 * fwhm_px)))
        with np.errstate(divide="ignore", invalid="ignore"):
            bright = fit.flux > 10.0 * fit.flux_err
        wings = wing_image(prf, x=fit.x[bright], y=fit.y[bright], flux=fit.flux[bright],
                           shape=sub.shape, core_half=core)
        # The rings spread a few per cent of every bright source's flux over tens of
        # pixels, which the clipped-mode mesh takes for sky: the sky is measured again on
        # the image minus the sources' models.
        models = sub - fit.residual + wings
        bkg, rms = estimate_background(_masked_difference(img, models, valid),
                                       mask=invalid, box_px=box)
        sub = _masked_difference(img, bkg, valid)
        if choice is not None and choice.prf is not None:
            # The pattern was fitted on the first sky, whose excess dimmed its rings:
            # its parameters are refined on the new one.
            refined = choose_prf(sub, weight_cal, x=det.x, y=det.y, flux=det.flux,
                                 snr=det.snr, fwhm_px=fwhm_px, refine=choice.prf,
                                 lambda_over_d_px=optics_lod_px)
            if refined.prf is not None:
                choice, prf = refined, refined.prf
                wings = wing_image(prf, x=fit.x[bright], y=fit.y[bright],
                                   flux=fit.flux[bright], shape=sub.shape, core_half=core)
        data = _masked_difference(sub, wings, valid)
        fit = fit_sources(fit.x, fit.y, fit.flux)
    seg = det.n_in_segment
    prf_mismatch = 0.0
    if residual_pass and det.x.size:
        # Detect on the residual: companions lost in a brighter source's peak show up here.
        # Where the PRF model does not match the data's PSF (an undersampled mosaic PSF is not
        # a pixel-integrated Gaussian), bright sources leave residual lumps of a few per cent
        # of their model: that mismatch is part of the residual's noise, or the lumps become
        # sources that take flux from the real one.
        prf_mismatch = _prf_mismatch(fit)
        if prf_mismatch > MIN_PRF_MISMATCH:
            # A shape or width mismatch leaves its lumps in the source's wings, where the
            # model itself is small: the mismatch's noise is that fraction of the model's
            # peak nearby (its maximum within FWHM/2), not of the model at each pixel
            # (24 um BCDs at PA 0, aligned with the mosaic grid, gave 10 lumps at 1.5-3 px
            # from bright sources as sources at S/N up to 37 without it).
            from scipy import ndimage

            model = ndimage.maximum_filter(data - fit.residual,
                                           size=2 * math.ceil(0.5 * fwhm_px) + 1)
            w_res = np.zeros_like(weight_cal)
            np.divide(1.0, 1.0 / np.where(valid, weight_cal, 1.0)
                      + np.square(prf_mismatch * model), out=w_res, where=valid)
            mf_res = matched_filter(fit.residual, w_res, fwhm_px=mf_fwhm_px, calibrate=False)
        else:
            mf_res = refilter(mf, fit.residual, weight)
        more = find_peaks(mf_res, threshold=detect_sigma, valid=valid, segments=False)
        if more.x.size:
            # Only accept residual peaks not at an already fitted position (fit imperfections).
            d2 = (more.x[:, None] - fit.x[None, :]) ** 2 + (more.y[:, None] - fit.y[None, :]) ** 2
            new = np.min(d2, axis=1) > (0.5 * fwhm_px) ** 2
            # ... nor a lump in a much brighter source's wings: below the deblending contrast
            # of SExtractor (DEBLEND_MINCONT 0.005) of a source within 3 FWHM.
            near = d2 < (3.0 * fwhm_px) ** 2
            brightest = np.max(np.where(near, fit.flux[None, :], 0.0), axis=1)
            new &= more.flux >= MIN_RESIDUAL_CONTRAST * brightest
            if np.any(new):
                x0 = np.concatenate([fit.x, more.x[new]])
                y0 = np.concatenate([fit.y, more.y[new]])
                f0 = np.concatenate([fit.flux, more.flux[new]])
                seg = np.concatenate([seg, np.full(int(new.sum()), 2)])
                # Only the groups receiving a new source change: the others start (and stay)
                # at their fitted values.
                fit = fit_sources(x0, y0, f0, free=np.arange(x0.size) >= fit.x.size)
    # Drop sources the fit merged into a neighbour or pushed negative: keep the brighter twin.
    keep = np.isfinite(fit.flux) & np.isfinite(fit.flux_err) & (fit.flux > 0)
    if prf is not None:
        # Pieces of a bright source's rings, detected as peaks: the diffraction model
        # explains their light, and the fit leaves them below half the detection threshold
        # (a real source detected at 5 sigma falls there in < 1% of cases).
        keep &= fit.flux >= 0.5 * detect_sigma * fit.flux_err
    if fit.flux.size > 1:
        from scipy.spatial import cKDTree

        pairs = cKDTree(np.column_stack([fit.x, fit.y])).query_pairs(
            0.5 * fwhm_px, output_type="ndarray"
        )
        if len(pairs):
            fainter = np.where(
                fit.flux[pairs[:, 0]] < fit.flux[pairs[:, 1]], pairs[:, 0], pairs[:, 1]
            )
            keep[fainter] = False
    if not np.all(keep):
        seg = seg[keep]
        # Only the groups that lost a source are refitted; the others keep their values.
        fit = fit_sources(fit.x[keep], fit.y[keep], fit.flux[keep],
                          free=np.isin(fit.group, fit.group[~keep])[keep])

    # Aperture photometry at the fitted positions.
    fwhm_as = fwhm_px * pix_arcsec
    r_as = float(aperture_radius_arcsec) if aperture_radius_arcsec else 1.2 * fwhm_as
    table_corr = _table_aperture_correction(band, r_as) if band_aperture_table else None
    r_px = r_as / pix_arcsec
    prf_ee = prf_enclosed_fraction(prf, r_px) if prf is not None else None
    if aperture_correction is not None:
        apcorr, apc_src = float(aperture_correction), "parameter"
    elif table_corr is not None:
        apcorr, apc_src = table_corr, "MIPS band table (real PSF)"
    elif prf is not None and prf_ee is not None:
        apcorr, apc_src = 1.0 / prf_ee, f"{prf.name} PRF"
    else:
        # The PRF fitted is a Gaussian: its own correction keeps flux_ap consistent with flux.
        # The MIPS table (real PSF, Airy rings: 1.61 at 7") would be wrong by up to 50% here.
        apcorr, apc_src = (
            gaussian_aperture_correction(
                fwhm_arcsec=fwhm_as, radius_arcsec=r_as, pixel_arcsec=pix_arcsec
            ),
            "Gaussian PRF",
        )
    if subtract_neighbours:
        # Aperture on the residual image plus the source's own model: the fitted neighbours are
        # removed from the aperture, the source's own light is kept (model part: its fitted
        # flux times the Gaussian model's enclosed fraction).
        ap_sum, ap_err = aperture_fluxes(
            fit.residual,
            err_cal,
            x=fit.x,
            y=fit.y,
            radius_px=r_px,
            mask=invalid,
        )
        own = (prf_ee if prf_ee is not None else
               1.0 / gaussian_aperture_correction(
                   fwhm_arcsec=fwhm_px, radius_arcsec=r_px, pixel_arcsec=1.0))
        ap_sum = ap_sum + fit.flux * own
    else:
        ap_sum, ap_err = aperture_fluxes(
            sub, err_cal, x=fit.x, y=fit.y, radius_px=r_px, mask=invalid
        )

    flux_ujy = fit.flux * ujy_per_pix
    dflux_ujy = fit.flux_err * ujy_per_pix
    flux_ap = ap_sum * apcorr * ujy_per_pix
    dflux_ap = ap_err * apcorr * ujy_per_pix
    zero_jy = vega_zero_jy if vega_zero_jy is not None else (band.vega_zero_jy if band else None)
    if zero_jy is not None:
        mag, dmag = vega_magnitude(flux_ujy, dflux_ujy, vega_zero_jy=float(zero_jy))
    else:
        mag, dmag = np.full(flux_ujy.size, np.nan), np.full(flux_ujy.size, np.nan)

    # The fit's position errors carry the flux's noise calibration (uscale); a position's
    # noise has its own (correlated noise moves positions less than fluxes).
    pos_scale = (position_noise_scale(mf, weight, valid=valid, fwhm_px=fwhm_px)
                 if calibrate_unc and fit.x.size else uscale)
    x_err = fit.x_err * (pos_scale / uscale)
    y_err = fit.y_err * (pos_scale / uscale)
    ra, dec = wcs.pixel_to_world_values(fit.x, fit.y)
    cd = wcs.pixel_scale_matrix * 3600.0  # arcsec per pixel, rows = (RA, Dec) axes
    dra = np.hypot(cd[0, 0] * x_err, cd[0, 1] * y_err)
    ddec = np.hypot(cd[1, 0] * x_err, cd[1, 1] * y_err)
    iy = np.clip(np.round(fit.y).astype(int), 0, img.shape[0] - 1)
    ix = np.clip(np.round(fit.x).astype(int), 0, img.shape[1] - 1)

    n = fit.flux.size
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_col = flux_ujy / dflux_ujy
    # (name, values, unit): one Table construction instead of a column added at a time; the
    # arrays are this function's own, one per column (no copy).
    columns: list[tuple[str, np.ndarray, u.UnitBase | None]] = [
        ("srcid", np.arange(1, n + 1, dtype=np.int32), None),
        ("RA", np.asarray(ra, dtype=float), u.deg),
        ("delta_RA", dra, u.arcsec),
        ("Dec", np.asarray(dec, dtype=float), u.deg),
        ("delta_Dec", ddec, u.arcsec),
        ("x", fit.x, u.pix),
        ("delta_x", x_err, u.pix),
        ("y", fit.y, u.pix),
        ("delta_y", y_err, u.pix),
        ("flux", flux_ujy, u.uJy),
        ("delta_flux", dflux_ujy, u.uJy),
        ("SNR", snr_col, None),
        ("flux_ap", flux_ap, u.uJy),
        ("delta_flux_ap", dflux_ap, u.uJy),
        ("mag_vega", mag, u.mag),
        ("delta_mag", dmag, u.mag),
        ("bckgrnd", bkg[iy, ix], u.MJy / u.sr),
        ("chi2_dof", fit.chi2_dof, None),
        ("N_PS", fit.n_in_group.astype(np.int32), None),
        ("deblend", ((fit.n_in_group > 1) | (seg > 1)).astype(np.int16), None),
        ("coverage", cov[iy, ix] if cov is not None else np.full(n, np.nan), None),
    ]
    t = Table(
        [values for _, values, _ in columns],
        names=[name for name, _, _ in columns],
        units=[unit for _, _, unit in columns],
        copy=False,
    )
    t.meta.update(
        {
            "BAND": band_name,
            "FWHM": round(fwhm_as, 4),
            "FWHMSRC": fwhm_src,
            "APRAD": r_as,
            "APCORR": apcorr,
            "APCSRC": apc_src,
            "PIXSCAL": pix_arcsec,
            "UJYPPIX": ujy_per_pix,
            "UNCSCALE": uscale,
            "POSSCALE": round(pos_scale, 4),
            "NSIGDET": detect_sigma,
            "BKGRMS": float(np.median(rms[valid])),
            "APNBSUB": bool(subtract_neighbours),
            "PRFMISM": round(prf_mismatch, 4),
            "PRFMODEL": "Gaussian" if prf is None else prf.name,
        }
    )
    if prf is not None:
        lod = prf.params.get("lambda_over_d_px")
        if lod is not None:
            t.meta["PRFLAMD"] = round(lod * pix_arcsec, 4)  # lambda/D (arcsec)
            t.meta["PRFOBSC"] = round(prf.params.get("obscuration", 0.0), 4)
            t.meta["PRFBLUR"] = round(prf.params.get("blur_fwhm_px", 0.0) * pix_arcsec, 4)
        t.meta["PRFFWHM"] = round(prf.fwhm_px * pix_arcsec, 4)
    if choice is not None:
        # Sources the PSF models were compared on: 0 means the data could not tell (the
        # Gaussian assumed).
        t.meta["PRFTEST"] = choice.n_sources if choice.tested else 0
        t.meta["PRFWHY"] = choice.reason  # why that model (for the log and the reader)
        if math.isfinite(choice.chi2_tabulated):
            t.meta["PRFDCHI2"] = round(choice.chi2_gaussian - choice.chi2_tabulated, 1)
    return t


def _prf_mismatch(fit: PrfFit, *, min_snr: float = 50.0, min_sources: int = 3) -> float:
    """Fractional mismatch between the PRF model and the data's PSF: the median over bright
    isolated sources of sqrt(excess chi^2 / model power), (chi^2 - npix) / (S/N)^2 (the
    model's power in the weighted sum is (S/N)^2). 0 when the model fits to the noise, or
    with fewer than `min_sources` bright isolated sources."""
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = fit.flux / fit.flux_err
    bright = np.isfinite(snr) & (snr > min_snr) & (fit.n_in_group == 1)
    if int(bright.sum()) < min_sources:
        return 0.0
    excess = (fit.chi2[bright] - fit.npix[bright]) / np.square(snr[bright])
    return float(np.sqrt(max(float(np.median(excess)), 0.0)))


def _masked_difference(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """a - b where `valid`, 0 elsewhere (np.where(valid, a - b, 0.0) without the temporary)."""
    out = np.zeros_like(a)
    np.subtract(a, b, out=out, where=valid)
    return out


def _default_box(fwhm_px: float, shape: tuple[int, ...]) -> int:
    """Background cell side: 16 FWHM (>= 32 px), but at least ~6 cells across small images
    (a sky gradient under a crowded field is followed by more, smaller cells)."""
    side = max(32.0, 16.0 * fwhm_px)
    return round(min(side, max(min(shape) / 6.0, 4.0 * fwhm_px)))


def _table_aperture_correction(band: mips.MipsBand | None, radius_arcsec: float) -> float | None:
    """The band's tabulated correction for this radius (within 0.05"), if there is one.

    Only the corrections without a sky annulus apply: extract_sources subtracts the mesh
    background instead of an annulus.
    """
    if band is None:
        return None
    for r, sky_in, _sky_out, corr in band.aperture_corrections:
        if abs(r - radius_arcsec) < 0.05 and sky_in == 0.0:
            return corr
    return None
