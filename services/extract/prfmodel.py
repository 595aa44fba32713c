"""Which point-response model to fit: the pixel-integrated Gaussian, or the telescope's
diffraction pattern (an obscured Airy pattern with its rings), chosen from the data.

A real telescope's PSF is not a Gaussian: at 24 um the Spitzer PSF is the Airy pattern of the
85 cm mirror (FWHM ~1.03 lambda/D = 5.9"), whose rings hold ~30% of the flux. Fitting a
Gaussian to it measures the core only (fluxes ~0.7 of the truth) and leaves the rings in the
residual, where their pieces are detected as sources. `choose_prf` keeps the Gaussian unless
the bright sources show it misses their PSF and a physical diffraction pattern fits them
significantly better; `obscured_airy_prf` tabulates the pattern on any pixel grid, and
`SkyPsf` carries it to the BCDs (forced photometry, multiframe); `wing_image` renders the PRF
beyond the fitting stamps (the outer rings of bright sources), which the extraction subtracts
before it fits; `read_prf_file` takes a PRF given as a FITS image (e.g. the SSC's).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from scipy import ndimage
from scipy.optimize import minimize
from scipy.spatial import cKDTree
from scipy.special import j1

from services.extract.prf import FWHM_PER_SIGMA, TabulatedPrf, fit_point_sources

#: Oversampling of tabulated PRFs (odd: a pixel is an odd number of samples, centred).
OVERSAMPLE = 9
#: chi^2 improvement the diffraction pattern must bring over the Gaussian to be chosen (it has
#: two more parameters; 25 is a 5-sigma preference for one extra parameter).
MIN_DELTA_CHI2 = 25.0
#: The Gaussian is kept without trying the diffraction pattern when its fit to the bright
#: sources leaves a mismatch below this fraction of their flux (`_mismatch_squared`): 0.9% on
#: the simulated Gaussian MIPS mosaics (their resampling), 4% on undersampled IRAC-like ones,
#: 15-24% with a diffraction-limited PSF.
GAUSSIAN_GOOD_ENOUGH = 0.02
#: A fitted diffraction pattern whose blur FWHM exceeds this many lambda/D has no visible
#: rings (0.4-0.5 on the simulated diffraction-limited AORs, 1.1-1.5 where the pattern merely
#: fitted an undersampled Gaussian better than the Gaussian): it is not taken.
MAX_BLUR_PER_LAMBDA_D = 0.8
#: Largest relative difference of a fitted lambda/D from the optics' (when known): the
#: effective wavelength shifts with the source spectrum by a few per cent (0.2-0.7% measured).
MAX_LAMBDA_D_ERROR = 0.1
#: The Gaussian's quick check uses this many of the brightest sources.
QUICK_CHECK_SOURCES = 8


def obscured_airy_prf(
    *,
    lambda_over_d_px: float,
    obscuration: float = 0.0,
    blur_fwhm_px: float = 0.0,
    radius_px: float,
    oversample: int = OVERSAMPLE,
) -> TabulatedPrf:
    """PRF of a circular aperture with a central obscuration (diameter ratio `obscuration`),
    lambda/D = `lambda_over_d_px` pixels, convolved with a Gaussian of `blur_fwhm_px` (pointing
    jitter, detector diffusion, resampling) and integrated over the pixel; tabulated out to
    `radius_px`. Normalised to the total flux over the infinite plane: the grid's lattice sums
    are the encircled energy within its extent (~98% at 10 lambda/D)."""
    if lambda_over_d_px <= 0 or not 0.0 <= obscuration < 1.0 or blur_fwhm_px < 0:
        raise ValueError("need lambda/D > 0, 0 <= obscuration < 1, blur >= 0")
    k = int(oversample)
    if k % 2 == 0:
        raise ValueError(f"oversample must be odd, got {k}")
    blur_s = blur_fwhm_px / FWHM_PER_SIGMA * k  # samples
    margin = k + math.ceil(4 * blur_s)
    half = math.ceil(radius_px * k)
    n = half + margin
    # The pattern on one quadrant of the sample grid (the Bessel functions are most of the
    # cost), mirrored onto the others: the same values as on the whole grid.
    off = np.arange(0, n + 1) / k
    r = np.hypot(off[:, None], off[None, :])
    quadrant = _obscured_airy(r / lambda_over_d_px, obscuration) / lambda_over_d_px**2
    psf = np.empty((2 * n + 1, 2 * n + 1))  # per px^2
    psf[n:, n:] = quadrant
    psf[n:, : n + 1] = quadrant[:, ::-1]
    psf[: n + 1, n:] = quadrant[::-1, :]
    psf[: n + 1, : n + 1] = quadrant[::-1, ::-1]
    # Pixel integration: the mean over the k x k samples spanning a pixel (midpoint rule).
    prf = ndimage.uniform_filter(psf, size=k, mode="constant")
    if blur_s > 0:
        prf = ndimage.gaussian_filter(prf, blur_s, mode="constant", truncate=4.0)
    grid = prf[margin:-margin, margin:-margin] if margin else prf
    return TabulatedPrf(
        grid, oversample=k, name="obscured Airy",
        params={"lambda_over_d_px": float(lambda_over_d_px), "obscuration": float(obscuration),
                "blur_fwhm_px": float(blur_fwhm_px)},
    )


def _obscured_airy(u: np.ndarray, eps: float) -> np.ndarray:
    """Intensity per (lambda/D)^2 of the unit-power obscured Airy pattern at radius u (in
    lambda/D): (pi/4)(1 - eps^2) A^2, A the amplitude normalised to 1 at the centre."""
    x = np.pi * np.maximum(u, 1e-12)
    a = 2.0 * j1(x) / x
    if eps > 0:
        a = a - eps**2 * 2.0 * j1(eps * x) / (eps * x)
        a = a / (1.0 - eps**2)
    return (np.pi / 4.0) * (1.0 - eps**2) * a * a


@dataclass
class PrfChoice:
    """What `choose_prf` decided, and on what evidence (for headers and logs)."""

    prf: TabulatedPrf | None  #: None: the Gaussian
    n_sources: int  #: bright sources the models were compared on
    chi2_gaussian: float = math.nan
    chi2_tabulated: float = math.nan
    gaussian_mismatch: float = math.nan
    reason: str = ""

    @property
    def name(self) -> str:
        return "Gaussian" if self.prf is None else self.prf.name

    @property
    def tested(self) -> bool:
        """Whether the data were compared with the models (else too few bright sources)."""
        return bool(np.isfinite(self.gaussian_mismatch))


def choose_prf(
    image: np.ndarray,
    weight: np.ndarray,
    *,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    snr: np.ndarray,
    fwhm_px: float,
    lambda_over_d_px: float | None = None,
    min_snr: float = 30.0,
    max_sources: int = 20,
    min_sources: int = 3,
    ring_contrast: float = 0.05,
    refine: TabulatedPrf | None = None,
) -> PrfChoice:
    """Gaussian of `fwhm_px` or obscured Airy pattern: the one that fits the bright sources
    better (by `MIN_DELTA_CHI2`).

    `image` is background-subtracted, `weight` its calibrated 1/sigma^2; (x, y, flux, snr) the
    detections. A detection fainter than `ring_contrast` times another within 5 FWHM may be a
    piece of that one's rings: it is masked (a disc of 1.2 FWHM), never fitted, so that it
    cannot absorb the rings either model must explain. The sources compared are the
    `max_sources` with S/N >= `min_snr` whose stamp (2.2 FWHM: the first ring included) lies
    in the image, that are not ring-like and have no brighter detection on their stamp; the
    other detections near them are fitted with them (blends are the rule in a crowded field).
    The Gaussian is kept when it leaves the sources a mismatch below `GAUSSIAN_GOOD_ENOUGH`.
    Else the Airy pattern's lambda/D, central obscuration and blur are fitted (Nelder-Mead on
    the compared sources' chi^2; every flux and position free; the rings beyond the stamps
    subtracted, as the extraction does), starting from `lambda_over_d_px` (the optics' value
    when known, else the FWHM). The returned PRF is tabulated out to 10 lambda/D.
    `refine`: an Airy PRF chosen before (e.g. on a sky since measured again): its parameters
    are the start, with a third of the usual first steps, and the Gaussian's quick check is
    skipped.
    """
    h = max(3, math.ceil(2.2 * fwhm_px))
    ny, nx = image.shape
    n = x.size
    pos = np.column_stack([x, y])
    ring_like = np.zeros(n, dtype=bool)
    shadowed = np.zeros(n, dtype=bool)  # a brighter detection on the source's stamp
    if n > 1:
        pairs = cKDTree(pos).query_pairs(5.0 * fwhm_px, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        fainter = np.where(flux[i] < flux[j], i, j)
        brighter = np.where(flux[i] < flux[j], j, i)
        ring_like[fainter[flux[fainter] < ring_contrast * flux[brighter]]] = True
        close = np.max(np.abs(pos[i] - pos[j]), axis=1) <= h
        shadowed[fainter[close]] = True
    inside = (x >= h) & (x <= nx - 1 - h) & (y >= h) & (y <= ny - 1 - h)
    cand = np.flatnonzero((snr >= min_snr) & inside & ~ring_like & ~shadowed)
    cand = cand[np.argsort(-snr[cand])][:max_sources]
    if cand.size < min_sources:
        return PrfChoice(None, int(cand.size), reason=f"fewer than {min_sources} bright "
                         f"sources (S/N >= {min_snr:g}) to compare PSF models on")

    # The comparison is made ~90 times per choice, on a few dozen stamps of a mosaic that may
    # have millions of pixels: the masked weights of each set of compared sources are made
    # once, and the far rings (drawn in `wings` on the sources' squares, which are cleared
    # after) are subtracted on the refit's stamp pixels alone (in `work`, whose other pixels
    # no fit reads), never on the whole image. Both images are made at the first tabulated
    # trial: where the Gaussian's quick check passes (most data) there is none.
    scratch: list[np.ndarray] = []  # [work, wings]
    masked_weights: dict[tuple[bool, bytes], tuple[np.ndarray, np.ndarray]] = {}

    def compared_setup(compared: np.ndarray, neighbours: bool) -> tuple[np.ndarray,
                                                                         np.ndarray]:
        key = (neighbours, compared.tobytes())
        if key not in masked_weights:
            d_near = cKDTree(pos[compared]).query(pos, distance_upper_bound=2.0 * h)[0]
            near = np.isfinite(d_near)
            near[compared] = False
            masked = near & ring_like if neighbours else near
            w = _mask_discs(weight, x[masked], y[masked], 1.2 * fwhm_px)
            masked_weights[key] = (w, np.concatenate([compared,
                                                      np.flatnonzero(near & ~masked)]))
        return masked_weights[key]

    def chi2_of(prf: TabulatedPrf | None, fwhm: float, compared: np.ndarray, *,
                neighbours: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each compared source's chi^2, degrees of freedom and S/N under one model. The
        detections near them are fitted too, but the ring-like ones are masked (all of them,
        without `neighbours`)."""
        w, fitted = compared_setup(compared, neighbours)
        k = compared.size  # the compared sources come first
        fit = fit_point_sources(image, w, x0=x[fitted], y0=y[fitted], flux0=flux[fitted],
                                fwhm_px=fwhm, half_size=h, prf=prf, max_iter=10,
                                with_residual=False)
        if prf is not None:
            if not scratch:
                scratch.extend((image.copy(), np.zeros(image.shape)))
            work, wings = scratch
            prf.add_squares(wings, x=fit.x, y=fit.y, flux=np.maximum(fit.flux, 0.0),
                            core_half=h)
            stamps = _stamp_pixels(fit.x, fit.y, h, image.shape)
            work.ravel()[stamps] = image.ravel()[stamps] - wings.ravel()[stamps]
            _clear_squares(wings, fit.x, fit.y, math.ceil(prf.radius_px))
            fit = fit_point_sources(work, w, x0=fit.x, y0=fit.y, flux0=fit.flux, fwhm_px=fwhm,
                                    half_size=h, prf=prf, max_iter=10, with_residual=False)
        snr_fit = fit.flux[:k] / np.where(fit.flux_err[:k] > 0, fit.flux_err[:k], np.inf)
        return fit.chi2[:k], fit.npix[:k] - 3, snr_fit

    # The Gaussian is first tried on the brightest few isolated ones (no other detection
    # brighter than a tenth of them within two stamp half-sizes), alone, with every detection
    # near them masked: on data it fits (most data), that is all the choice costs.
    d2 = np.sum(np.square(pos[cand][:, None, :] - pos[None, :, :]), axis=2)
    rival = (d2 > 0) & (d2 < (2 * h) ** 2) & (flux[None, :] > 0.1 * flux[cand][:, None])
    quick = cand[~np.any(rival, axis=1)][:QUICK_CHECK_SOURCES]
    m2 = math.inf
    if quick.size >= min_sources and refine is None:
        compared = quick
        chi2_g, dof_g, snr_fit = chi2_of(None, fwhm_px, compared, neighbours=False)
        m2, c_noise = _mismatch_squared(chi2_g, dof_g, snr_fit)
    if m2 >= GAUSSIAN_GOOD_ENOUGH**2:
        compared = cand
        chi2_g, dof_g, snr_fit = chi2_of(None, fwhm_px, compared)
        m2, c_noise = _mismatch_squared(chi2_g, dof_g, snr_fit)
    # A source far above the sources' mismatch (an undetected neighbour, a saturated core) is
    # left out of the comparison.
    excess = (chi2_g - c_noise * dof_g) / np.maximum(np.square(snr_fit), 1e-300)
    med = m2
    mismatch = math.sqrt(max(med, 0.0))
    choice = PrfChoice(None, int(compared.size), gaussian_mismatch=mismatch)
    if mismatch < GAUSSIAN_GOOD_ENOUGH:
        choice.chi2_gaussian = float(np.sum(chi2_g))
        choice.reason = f"the Gaussian fits the bright sources (mismatch {mismatch:.4f})"
        return choice
    use = excess <= 3.0 * med
    chi2_g_sum = float(np.sum(chi2_g[use]))
    choice.chi2_gaussian, choice.n_sources = chi2_g_sum, int(use.sum())
    if choice.n_sources < min_sources:
        choice.reason = (f"the Gaussian misses the PSF by {mismatch:.1%}, but fewer than "
                         f"{min_sources} sources are clean enough to compare models on")
        return choice

    lod0 = float(lambda_over_d_px) if lambda_over_d_px else float(fwhm_px)

    def airy(p: np.ndarray, oversample: int = OVERSAMPLE) -> TabulatedPrf:
        lod = lod0 * math.exp(float(np.clip(p[0], -0.5, 0.5)))
        return obscured_airy_prf(lambda_over_d_px=lod,
                                 obscuration=float(np.clip(p[1], 0.0, 0.7)),
                                 blur_fwhm_px=float(np.clip(p[2], 0.0, 2.0 * fwhm_px)),
                                 radius_px=max(10.0 * lod, h + 3.0), oversample=oversample)

    def objective(p: np.ndarray) -> float:
        # 5 samples per pixel: >= 10 per lambda/D here, plenty for comparing models.
        prf = airy(p, oversample=5)
        return float(np.sum(chi2_of(prf, prf.fwhm_px, compared)[0][use]))

    steps = np.array([0.1, 0.2, 0.3 * fwhm_px])
    if refine is not None and "lambda_over_d_px" in refine.params:
        rp = refine.params
        start = np.array([math.log(rp["lambda_over_d_px"] / lod0), rp["obscuration"],
                          rp["blur_fwhm_px"]])
        steps = steps / 3.0
    else:
        start = np.array([0.0, 0.3, 0.3 * fwhm_px])
    simplex = start + np.vstack([np.zeros(3), np.diag(steps)])
    res = minimize(objective, start, method="Nelder-Mead",
                   options={"initial_simplex": simplex, "xatol": 0.01, "fatol": 1.0,
                            "maxfev": 60})
    choice.chi2_tabulated = float(res.fun)
    best = airy(res.x)
    lod, blur = best.params["lambda_over_d_px"], best.params["blur_fwhm_px"]
    implausible = _implausible_airy(lod, blur, lambda_over_d_px)
    if implausible:
        choice.reason = f"the best diffraction pattern is not physical: {implausible}"
    elif chi2_g_sum - float(res.fun) > MIN_DELTA_CHI2:
        choice.prf = best
        choice.reason = (f"the diffraction pattern fits the {choice.n_sources} bright sources "
                         f"better: chi^2 {res.fun:.0f} against {chi2_g_sum:.0f} for the "
                         f"Gaussian")
    else:
        choice.reason = (f"the diffraction pattern does not fit better (chi^2 {res.fun:.0f} "
                         f"against {chi2_g_sum:.0f})")
    return choice


def _implausible_airy(lambda_over_d_px: float, blur_fwhm_px: float,
                      optics_lambda_over_d_px: float | None) -> str:
    """Why a fitted diffraction pattern is not the telescope's ('' if it may be). Its rings
    are what sets it apart from a smooth profile: a blur wider than `MAX_BLUR_PER_LAMBDA_D`
    lambda/D washes them out (then the pattern is merely a flexible profile, which beats the
    Gaussian on any non-Gaussian PSF, e.g. an undersampled one); and lambda/D must be the
    optics' (within `MAX_LAMBDA_D_ERROR`) when they are known."""
    if blur_fwhm_px > MAX_BLUR_PER_LAMBDA_D * lambda_over_d_px:
        return (f"its blur ({blur_fwhm_px:.2f} px) would wash out the rings of lambda/D "
                f"{lambda_over_d_px:.2f} px")
    if optics_lambda_over_d_px and abs(lambda_over_d_px / optics_lambda_over_d_px - 1.0) \
            > MAX_LAMBDA_D_ERROR:
        return (f"lambda/D {lambda_over_d_px:.2f} px is not the optics' "
                f"{optics_lambda_over_d_px:.2f} px")
    return ""


def _mismatch_squared(chi2: np.ndarray, dof: np.ndarray, snr: np.ndarray) -> tuple[float,
                                                                                   float]:
    """(m^2, c) of chi2 = c dof + m^2 (S/N)^2 over the sources: a model that misses the PSF
    by a fraction m of each source's flux adds m^2 (S/N)^2 to its chi^2, on top of the noise's
    c x dof (c < 1 on a mosaic, whose resampling correlates the pixels' noise). Solved in
    relative terms (each source's chi^2 its own scale); c = 1 when the fit gives c <= 0."""
    snr2 = np.square(snr)
    rel = 1.0 / np.maximum(chi2, 1e-300)
    (c, m2), *_ = np.linalg.lstsq(np.column_stack([dof, snr2]) * rel[:, None], chi2 * rel,
                                  rcond=None)
    return float(m2), (float(c) if float(c) > 0 else 1.0)


def _mask_discs(weight: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """A copy of `weight` with 0 within `radius` pixels of each (x, y)."""
    out = weight.copy()
    r = math.ceil(radius)
    off = np.arange(-r, r + 1)
    ny, nx = weight.shape
    px = np.round(x).astype(np.int64)[:, None, None] + off[None, None, :]
    py = np.round(y).astype(np.int64)[:, None, None] + off[None, :, None]
    disc = (px - x[:, None, None]) ** 2 + (py - y[:, None, None]) ** 2 <= radius**2
    disc &= (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    out[np.broadcast_to(py, disc.shape)[disc], np.broadcast_to(px, disc.shape)[disc]] = 0.0
    return out


def wing_image(
    prf: TabulatedPrf,
    *,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    shape: tuple[int, int],
    core_half: int,
) -> np.ndarray:
    """The sources' PRF beyond their fitting stamps: flux x PRF on the square of the PRF's
    radius around (round(x), round(y)), minus the central square of half-size `core_half`
    (the stamp `fit_point_sources` fits there when started at these positions)."""
    out = np.zeros(shape)
    prf.add_squares(out, x=x, y=y, flux=flux, core_half=core_half)
    return out


def _clear_squares(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: int) -> None:
    """Zero `image` on the squares of half-size `radius` around (round(x), round(y))."""
    for cx, cy in zip(np.round(x).astype(int), np.round(y).astype(int), strict=True):
        image[max(cy - radius, 0):max(cy + radius + 1, 0),
              max(cx - radius, 0):max(cx + radius + 1, 0)] = 0.0


def _stamp_pixels(x: np.ndarray, y: np.ndarray, half: int, shape: tuple[int, int]
                  ) -> np.ndarray:
    """Sorted distinct flat indices of the image pixels on the squares of half-size `half`
    around (round(x), round(y))."""
    ny, nx = shape
    off = np.arange(-half, half + 1)
    px = np.clip(np.round(x).astype(np.int64)[:, None] + off, 0, nx - 1)
    py = np.clip(np.round(y).astype(np.int64)[:, None] + off, 0, ny - 1)
    return np.unique(py[:, :, None] * nx + px[:, None, :])


@dataclass(frozen=True)
class SkyPsf:
    """A point-spread function in sky units, to lay on any frame's pixels (the BCDs a mosaic
    was made of, for forced photometry and multiframe fits): the Gaussian of `fwhm_arcsec`,
    or, with `lambda_over_d_arcsec`, the obscured Airy pattern blurred by a Gaussian of
    `blur_fwhm_arcsec` (both integrated over the frame's pixels). `fwhm_arcsec` also sizes the
    fitting stamps."""

    fwhm_arcsec: float
    lambda_over_d_arcsec: float | None = None
    obscuration: float = 0.0
    blur_fwhm_arcsec: float = 0.0

    @classmethod
    def from_table_meta(cls, meta: Mapping[str, object], fwhm_arcsec: float) -> SkyPsf:
        """The PSF an extraction fitted (its table's PRFMODEL, PRFLAMD, PRFOBSC, PRFBLUR), with
        `fwhm_arcsec` for the stamps; the Gaussian when the table says so (or nothing)."""
        if meta.get("PRFMODEL") == "obscured Airy" and "PRFLAMD" in meta:
            return cls(fwhm_arcsec, lambda_over_d_arcsec=_meta_float(meta, "PRFLAMD"),
                       obscuration=_meta_float(meta, "PRFOBSC"),
                       blur_fwhm_arcsec=_meta_float(meta, "PRFBLUR"))
        return cls(fwhm_arcsec)

    @property
    def is_gaussian(self) -> bool:
        return self.lambda_over_d_arcsec is None

    def on_frames(self, *, frame_pixel_arcsec: float, fwhm_arcsec: float) -> SkyPsf:
        """This mosaic PSF as seen on frames of `frame_pixel_arcsec` pixels; `fwhm_arcsec` is
        the frames' FWHM (stamps, and the width of a Gaussian PSF).

        The blur fitted on the mosaic (whose PRF model already integrates over the mosaic
        pixel) holds two boxes of the frame pixel, variance p^2/12 each: the detector's pixel
        integration, and the area-overlap resampling of the frame's piecewise-constant
        pixels. The frames' model integrates over their pixel itself, so both come out of
        the blur (in quadrature, clamped at 0: what is left is jitter and optics). Measured
        on the simulated diffraction-limited AOR, the mosaic blur is 0.95x (24 um) and 0.89x
        (70 um) of the two boxes' FWHM, and forced fluxes on the BCDs are unbiased with no
        blur left (5% high at 70 um with one box only taken out)."""
        if self.is_gaussian:
            return SkyPsf(fwhm_arcsec)
        box2 = 2.0 * 8.0 * math.log(2.0) / 12.0 * frame_pixel_arcsec**2
        blur = math.sqrt(max(self.blur_fwhm_arcsec**2 - box2, 0.0))
        return SkyPsf(fwhm_arcsec, self.lambda_over_d_arcsec, self.obscuration, blur)

    def stamps(self, x: np.ndarray, y: np.ndarray, px0: np.ndarray, py0: np.ndarray,
               size: int, pix_arcsec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The PSF of k sources at pixel (x, y) on square stamps of `size` pixels whose first
        pixel is (px0, py0), with its derivatives in the source's x and y: each (k, size, size).
        `pix_arcsec` (k,) is the frame's local pixel side at each source (the Airy pattern is
        tabulated once per frame, at the median: a BCD's scale varies by < 1%)."""
        k = x.size
        pix = np.broadcast_to(np.asarray(pix_arcsec, dtype=float), (k,))
        off = np.arange(size)
        if self.is_gaussian:
            from services.extract.prf import pixel_integrated_gaussian_1d, sigma_from_fwhm

            sigma_px = (sigma_from_fwhm(self.fwhm_arcsec) / pix)[:, None]
            gx, dgx = pixel_integrated_gaussian_1d(px0[:, None] + off - x[:, None], sigma_px)
            gy, dgy = pixel_integrated_gaussian_1d(py0[:, None] + off - y[:, None], sigma_px)
            return (gy[:, :, None] * gx[:, None, :], gy[:, :, None] * dgx[:, None, :],
                    dgy[:, :, None] * gx[:, None, :])
        p = round(float(np.median(pix)), 4) if k else 1.0
        prf = _airy_on_pixels(float(self.lambda_over_d_arcsec or 0.0) / p, self.obscuration,
                              self.blur_fwhm_arcsec / p, size / 2.0 + 2.0)
        ones = np.ones((k, size))
        prof, dpx, dpy = prf.stamps(px0 - x, py0 - y, size, ones, ones)
        shape = (k, size, size)
        return prof.reshape(shape), dpx.reshape(shape), dpy.reshape(shape)


def _meta_float(meta: Mapping[str, object], key: str) -> float:
    value = meta.get(key, 0.0)
    return float(value) if isinstance(value, (int, float, str)) else 0.0


@functools.lru_cache(maxsize=16)
def _airy_on_pixels(lambda_over_d_px: float, obscuration: float, blur_fwhm_px: float,
                    radius_px: float) -> TabulatedPrf:
    """`obscured_airy_prf`, cached (one tabulation serves every frame of a pixel scale)."""
    return obscured_airy_prf(lambda_over_d_px=lambda_over_d_px, obscuration=obscuration,
                             blur_fwhm_px=blur_fwhm_px, radius_px=radius_px)


class PrfFileError(ValueError):
    """A PRF file that cannot be used (what to fix is in the message)."""


#: Header keywords naming a PRF file's sampling: samples per pixel, and the pixel (arcsec) the
#: PRF is integrated over.
PRF_FILE_KEYWORDS = ("OVERSAMP", "PIXSCALE")


def read_prf_file(hdul: fits.HDUList, *, pixel_arcsec: float, name: str = "PRF file"
                  ) -> TabulatedPrf:
    """A tabulated PRF from a FITS image (e.g. the SSC's PRF for a mosaic pixel scale).

    The image holds the PRF sampled `OVERSAMP` times per pixel, each sample the fraction of a
    point source's flux in a pixel of `PIXSCALE` arcsec centred there; the source lies at
    CRPIX1/2 (1-based, FITS convention; default: the image's centre). The pixel must be the
    mosaic's (`pixel_arcsec`, to 1%): a PRF integrates over one pixel size. An even sampling,
    or a centre between samples, is resampled (cubic spline) onto an odd one. The samples are
    used as fractions of the total flux when their lattice sums lie in 0.5-1.02 (the wings
    beyond the file's extent then stay out of the model, as they should); otherwise (e.g.
    peak-normalised) they are scaled to lattice sums of 1, and the name says so.
    """
    from scipy.ndimage import map_coordinates

    from shared import fitsio

    try:
        data, header = fitsio.image_hdu(hdul)
    except (ValueError, IndexError) as exc:
        raise PrfFileError(f"{name}: no image HDU ({exc})") from exc
    grid = np.asarray(data, dtype=float)
    if grid.ndim != 2 or min(grid.shape) < 5 or not np.all(np.isfinite(grid)):
        raise PrfFileError(f"{name}: the PRF must be a finite 2-D image, got shape {grid.shape}")
    missing = [k for k in PRF_FILE_KEYWORDS if k not in header]
    if missing:
        raise PrfFileError(f"{name}: set {', '.join(missing)} in its header (OVERSAMP: samples "
                           "per pixel; PIXSCALE: the pixel in arcsec the PRF integrates over)")
    k = int(header["OVERSAMP"])
    pix = float(header["PIXSCALE"])
    if k < 1 or pix <= 0:
        raise PrfFileError(f"{name}: OVERSAMP must be >= 1 and PIXSCALE > 0")
    if abs(pix / pixel_arcsec - 1.0) > 0.01:
        raise PrfFileError(f"{name}: the PRF is for {pix:g}\" pixels but the mosaic's are "
                           f"{pixel_arcsec:g}\": use a PRF made for this pixel scale")
    ny, nx = grid.shape
    cy = float(header.get("CRPIX2", (ny + 1) / 2.0)) - 1.0  # 0-based sample index
    cx = float(header.get("CRPIX1", (nx + 1) / 2.0)) - 1.0
    k_out = k if k % 2 else k + 1
    half = int(min(cx, cy, nx - 1 - cx, ny - 1 - cy) / k * k_out)  # output samples each side
    if half < 2 * k_out:
        raise PrfFileError(f"{name}: the PRF covers less than 2 pixels around its centre")
    if k_out == k and cx == round(cx) and cy == round(cy):
        out = grid[round(cy) - half : round(cy) + half + 1, round(cx) - half : round(cx) + half + 1]
    else:
        t = np.arange(-half, half + 1) * (k / k_out)
        yy, xx = np.meshgrid(cy + t, cx + t, indexing="ij")
        out = map_coordinates(grid, [yy, xx], order=3, mode="constant")
    total = float(out.sum()) / k_out**2  # a lattice sum: the flux within the file's extent
    if total <= 0:
        raise PrfFileError(f"{name}: the PRF's samples sum to {total:g}")
    if 0.5 <= total <= 1.02:
        return TabulatedPrf(out, oversample=k_out, name=name)
    # Not fractions of the total flux (e.g. peak-normalised): the extent holds all the flux.
    return TabulatedPrf(out / total, oversample=k_out, name=f"{name} (normalised to its extent)")


def load_prf_file(path: str, *, pixel_arcsec: float) -> TabulatedPrf:
    """`read_prf_file` of the FITS file at `path`, named after the file; read once per file
    version (path and modification time) and pixel scale, not once per mosaic."""
    import os

    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise PrfFileError(f"PRF file {path}: cannot be read ({exc})") from exc
    return _load_prf_file(path, mtime, round(pixel_arcsec, 6))


@functools.lru_cache(maxsize=8)
def _load_prf_file(path: str, mtime_ns: int, pixel_arcsec: float) -> TabulatedPrf:
    """`load_prf_file`'s read (`mtime_ns` only keys the cache)."""
    import os

    try:
        with fits.open(path, memmap=False) as hdul:
            return read_prf_file(hdul, pixel_arcsec=pixel_arcsec, name=os.path.basename(path))
    except OSError as exc:
        raise PrfFileError(f"PRF file {path}: cannot be read ({exc})") from exc
