"""A seeded synthetic far-infrared sky (point sources + smooth background) and its renderer.

`make_sky` draws point sources with power-law spectra across the MIPS bands (24/70/160 um)
and a background with a linear gradient; `render` projects them onto any pixel grid given an
astropy WCS (SIP distortion included) as a noiseless image in MJy/sr, integrating a Gaussian
PSF over each pixel so that sum(MJy/sr x pixel solid angle) is the source flux.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy import special

from shared.instruments import mips

#: MJy per uJy
_MJY_PER_UJY = 1e-12

#: Default background per channel: (MJy/sr at the field centre, MJy/sr per arcmin east,
#: MJy/sr per arcmin north). 24 um ~ zodiacal light; 70/160 um ~ cirrus.
DEFAULT_BACKGROUND: dict[int, tuple[float, float, float]] = {
    1: (20.0, 0.15, 0.08),
    2: (6.0, 0.05, -0.04),
    3: (15.0, 0.2, 0.1),
}


@dataclass(frozen=True, slots=True)
class Sky:
    """Point sources and a linear background, per MIPS channel.

    `sources` columns: id, ra, dec (deg), flux_24_ujy, flux_70_ujy, flux_160_ujy, alpha (the
    spectral index: S_nu ~ lambda**alpha). `background[ch]` is (MJy/sr at (ra0, dec0),
    gradient east, gradient north, both MJy/sr per arcmin of tangent-plane offset).
    """

    ra0_deg: float
    dec0_deg: float
    sources: Table
    background: dict[int, tuple[float, float, float]]

    def flux_column(self, channel: int) -> str:
        return {1: "flux_24_ujy", 2: "flux_70_ujy", 3: "flux_160_ujy"}[channel]

    def background_mjysr(self, channel: int, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
        """Background surface brightness (MJy/sr) at sky positions."""
        level, grad_e, grad_n = self.background[channel]
        xi, eta = tangent_offsets_arcsec(ra_deg, dec_deg, self.ra0_deg, self.dec0_deg)
        return level + (grad_e * xi + grad_n * eta) / 60.0


def tangent_offsets_arcsec(
    ra_deg: np.ndarray, dec_deg: np.ndarray, ra0_deg: float, dec0_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (TAN) offsets (xi east, eta north) in arcsec of positions from (ra0, dec0)."""
    ra = np.radians(ra_deg)
    dec = np.radians(dec_deg)
    ra0 = math.radians(ra0_deg)
    dec0 = math.radians(dec0_deg)
    cosc = math.sin(dec0) * np.sin(dec) + math.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    xi = np.cos(dec) * np.sin(ra - ra0) / cosc
    eta = (math.cos(dec0) * np.sin(dec) - math.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cosc
    return np.degrees(xi) * 3600.0, np.degrees(eta) * 3600.0


def tangent_to_sky(
    xi_arcsec: np.ndarray, eta_arcsec: np.ndarray, ra0_deg: float, dec0_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `tangent_offsets_arcsec`: (ra, dec) in degrees."""
    xi = np.radians(np.asarray(xi_arcsec, dtype=float) / 3600.0)
    eta = np.radians(np.asarray(eta_arcsec, dtype=float) / 3600.0)
    ra0 = math.radians(ra0_deg)
    dec0 = math.radians(dec0_deg)
    denom = math.cos(dec0) - eta * math.sin(dec0)
    ra = ra0 + np.arctan2(xi, denom)
    dec = np.arctan2(math.sin(dec0) + eta * math.cos(dec0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def make_sky(
    *,
    ra_deg: float,
    dec_deg: float,
    half_size_arcsec: float,
    n_sources: int,
    flux_24_min_ujy: float,
    flux_24_max_ujy: float,
    seed: int,
    count_slope: float = 0.7,
    alpha_range: tuple[float, float] = (-1.0, 2.5),
    background: dict[int, tuple[float, float, float]] | None = None,
) -> Sky:
    """Draw a sky: `n_sources` uniformly in a square of +-`half_size_arcsec` (tangent plane).

    24 um fluxes follow N(>S) ~ S**-count_slope between the limits (uJy); 70 and 160 um
    fluxes are S_24 * (lambda/23.68 um)**alpha with alpha uniform in `alpha_range`, so blue
    sources drop out at 70 um while red ones are bright there.
    """
    if flux_24_min_ujy <= 0 or flux_24_max_ujy <= flux_24_min_ujy:
        raise ValueError("need 0 < flux_24_min_ujy < flux_24_max_ujy")
    rng = np.random.default_rng(seed)
    xi = rng.uniform(-half_size_arcsec, half_size_arcsec, n_sources)
    eta = rng.uniform(-half_size_arcsec, half_size_arcsec, n_sources)
    ra, dec = tangent_to_sky(xi, eta, ra_deg, dec_deg)
    # Inverse-CDF draw of a truncated power law N(>S) ~ S^-k.
    u = rng.uniform(0.0, 1.0, n_sources)
    k = count_slope
    lo, hi = flux_24_min_ujy**-k, flux_24_max_ujy**-k
    f24 = (lo - u * (lo - hi)) ** (-1.0 / k)
    alpha = rng.uniform(alpha_range[0], alpha_range[1], n_sources)
    w = {ch: mips.BANDS[ch].wavelength_um for ch in (1, 2, 3)}
    f70 = f24 * (w[2] / w[1]) ** alpha
    f160 = f24 * (w[3] / w[1]) ** alpha
    table = Table(
        {
            "id": np.arange(1, n_sources + 1, dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "flux_24_ujy": f24,
            "flux_70_ujy": f70,
            "flux_160_ujy": f160,
            "alpha": alpha,
        }
    )
    table["ra"].unit = "deg"
    table["dec"].unit = "deg"
    for c in ("flux_24_ujy", "flux_70_ujy", "flux_160_ujy"):
        table[c].unit = "uJy"
    return Sky(ra_deg, dec_deg, table, dict(background or DEFAULT_BACKGROUND))


def pixel_area_arcsec2(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True solid angle (arcsec^2) of pixels centred at (x, y) (0-based), SIP included."""
    jac = _jacobian_arcsec(wcs, np.asarray(x, float), np.asarray(y, float))
    return np.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0])


def _jacobian_arcsec(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d(xi, eta)/d(x, y) in arcsec per pixel at pixel positions (0-based), central differences."""
    h = 0.5
    n = x.size
    px = np.concatenate([x, x + h, x - h, x, x])
    py = np.concatenate([y, y, y, y + h, y - h])
    ra, dec = (np.asarray(a).reshape(5, n) for a in wcs.all_pix2world(px, py, 0))
    # Small-angle offsets about each point's own sky position.
    dra = ((ra - ra[0] + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec[0])) * 3600.0
    ddec = (dec - dec[0]) * 3600.0
    jac = np.empty((n, 2, 2))
    jac[:, 0, 0] = (dra[1] - dra[2]) / (2 * h)
    jac[:, 1, 0] = (ddec[1] - ddec[2]) / (2 * h)
    jac[:, 0, 1] = (dra[3] - dra[4]) / (2 * h)
    jac[:, 1, 1] = (ddec[3] - ddec[4]) / (2 * h)
    return jac


def render(
    sky: Sky,
    channel: int,
    wcs: WCS,
    shape: tuple[int, int],
    *,
    fwhm_arcsec: float | None = None,
    include_background: bool = True,
    n_sub: int = 5,
    stamp_fwhm: float = 2.5,
    airy_obscuration: float | None = None,
) -> np.ndarray:
    """Noiseless sky in MJy/sr on the grid (`shape` = (ny, nx)) of `wcs` (SIP applied).

    Each source is a circular Gaussian PSF of `fwhm_arcsec` (default: the band's) on the sky,
    mapped to pixels through the local Jacobian of the WCS at the source and integrated over
    each pixel (exactly with erf where the WCS is locally a similarity, else by averaging
    `n_sub` x `n_sub` sub-pixels); only
    a stamp of +-`stamp_fwhm` FWHM around each source is evaluated (vectorised over sources).
    sum(image x true pixel solid angle) equals the source flux to < 0.1 %.
    With `airy_obscuration` the PSF is instead the diffraction pattern of Spitzer's 85 cm
    mirror at the band's wavelength with that central obscuration (FWHM ~1.0 lambda/D, 5.8"
    at 24 um; rings holding ~30% of the flux), averaged over `n_sub` x `n_sub` sub-pixels out
    to 10 lambda/D (which holds ~98% of the flux: the rest, far below the noise, is not drawn).
    """
    ny, nx = shape
    fwhm = mips.BANDS[channel].psf_fwhm_arcsec if fwhm_arcsec is None else fwhm_arcsec
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    if airy_obscuration is not None:
        lod = mips.BANDS[channel].lambda_over_d_arcsec
        # Same stamps as the Gaussian's, to 10 lambda/D.
        stamp_fwhm = 10.0 * lod / fwhm
    image = np.zeros(ny * nx, dtype=np.float64)
    src = sky.sources
    flux = np.asarray(src[sky.flux_column(channel)], dtype=float)
    if len(src):
        xs, ys = wcs.all_world2pix(np.asarray(src["ra"]), np.asarray(src["dec"]), 0)
        jac = _jacobian_arcsec(wcs, xs, ys)
        pix_scale = np.sqrt(np.abs(np.linalg.det(jac)))
        half = int(np.ceil(stamp_fwhm * fwhm / pix_scale.min())) + 1
        inside = (
            np.isfinite(xs) & np.isfinite(ys) & (xs > -half) & (xs < nx - 1 + half)
            & (ys > -half) & (ys < ny - 1 + half) & (flux > 0)
        )  # fmt: skip
        idx = np.flatnonzero(inside)
        # Where the WCS is locally a similarity (square pixels, any rotation/flip: all MIPS
        # arrays; SIP makes it anisotropic by < 1e-3), the circular sky Gaussian stays
        # circular in pixels and integrates over each pixel exactly with erf; otherwise
        # average it over sub-pixels.
        sv = np.linalg.svd(jac[idx], compute_uv=False) if idx.size else np.ones((0, 2))
        similar = np.abs(sv[:, 0] / sv[:, 1] - 1.0) < 2e-3
        if airy_obscuration is not None:
            profile = functools.partial(_airy_interpolated, lambda_over_d_arcsec=lod,
                                        obscuration=airy_obscuration)
            for lo in range(0, idx.size, 8):  # big stamps: fewer sources per chunk
                sel = idx[lo : lo + 8]
                image += _render_stamps(xs[sel], ys[sel], flux[sel], jac[sel], sigma, half,
                                        n_sub, nx, ny, profile=profile)
        else:
            for chosen, fn in ((idx[similar], _render_erf), (idx[~similar], _render_stamps)):
                # Chunks of sources bound the memory of the (source, stamp, sub-pixel) arrays.
                for lo in range(0, chosen.size, 64):
                    sel = chosen[lo : lo + 64]
                    image += fn(xs[sel], ys[sel], flux[sel], jac[sel], sigma, half, n_sub,
                                nx, ny)
    out: np.ndarray = image.reshape(ny, nx)
    if include_background:
        yy, xx = np.mgrid[0:ny, 0:nx]
        ra, dec = wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
        out += sky.background_mjysr(channel, ra, dec).reshape(ny, nx)
    return out


def _render_erf(
    xs: np.ndarray,
    ys: np.ndarray,
    flux_ujy: np.ndarray,
    jac: np.ndarray,
    sigma_arcsec: float,
    half: int,
    n_sub: int,
    nx: int,
    ny: int,
) -> np.ndarray:
    """Flattened (ny*nx) image of exactly pixel-integrated circular Gaussians, MJy/sr."""
    del n_sub  # exact integration needs no sub-pixels
    area = np.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0])  # arcsec^2 / px
    sig_px = sigma_arcsec / np.sqrt(area)
    x0 = np.rint(xs).astype(int)
    y0 = np.rint(ys).astype(int)
    off = np.arange(-half, half + 1)
    edges = np.arange(-half - 0.5, half + 1.0)  # pixel edges relative to x0
    s2 = (np.sqrt(2.0) * sig_px)[:, None]
    cx = special.erf(((x0 - xs)[:, None] + edges) / s2)
    cy = special.erf(((y0 - ys)[:, None] + edges) / s2)
    ex = 0.5 * np.diff(cx, axis=1)  # fraction of the flux in each stamp column
    ey = 0.5 * np.diff(cy, axis=1)
    # Pixel value = flux fraction / pixel solid angle, in MJy/sr.
    norm = flux_ujy * _MJY_PER_UJY / (area * mips.SR_PER_ARCSEC2)
    vals = norm[:, None, None] * ey[:, :, None] * ex[:, None, :]
    px = np.broadcast_to(x0[:, None, None] + off[None, None, :], vals.shape)
    py = np.broadcast_to(y0[:, None, None] + off[None, :, None], vals.shape)
    ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    return np.bincount(py[ok] * nx + px[ok], weights=vals[ok], minlength=ny * nx)


def _render_stamps(
    xs: np.ndarray,
    ys: np.ndarray,
    flux_ujy: np.ndarray,
    jac: np.ndarray,
    sigma_arcsec: float,
    half: int,
    n_sub: int,
    nx: int,
    ny: int,
    profile: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Flattened (ny*nx) image of pixel-averaged Gaussian stamps (or of `profile`, the PSF
    per arcsec^2 at squared radius r^2 in arcsec^2, of unit total flux), MJy/sr."""
    x0 = np.rint(xs).astype(int)
    y0 = np.rint(ys).astype(int)
    off = np.arange(-half, half + 1)
    sub = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    # Axes: (source, stamp y, stamp x, sub y, sub x); offsets in pixels from the source.
    dx = (x0 - xs)[:, None, None, None, None] + off[None, None, :, None, None] + sub
    dy = (y0 - ys)[:, None, None, None, None] + off[None, :, None, None, None] + sub[:, None]
    j = jac[:, :, :, None, None, None, None]
    xi = j[:, 0, 0] * dx + j[:, 0, 1] * dy
    eta = j[:, 1, 0] * dx + j[:, 1, 1] * dy
    if profile is None:
        g = np.exp(-(xi * xi + eta * eta) / (2.0 * sigma_arcsec**2)).mean(axis=(3, 4))
        # Flux x normalised Gaussian per arcsec^2, in MJy/sr.
        norm = flux_ujy * _MJY_PER_UJY / (2.0 * math.pi * sigma_arcsec**2) / mips.SR_PER_ARCSEC2
    else:
        g = profile(xi * xi + eta * eta).mean(axis=(3, 4))
        norm = flux_ujy * _MJY_PER_UJY / mips.SR_PER_ARCSEC2
    vals = g * norm[:, None, None]
    px = np.broadcast_to(x0[:, None, None] + off[None, None, :], vals.shape)
    py = np.broadcast_to(y0[:, None, None] + off[None, :, None], vals.shape)
    ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    return np.bincount(py[ok] * nx + px[ok], weights=vals[ok], minlength=ny * nx)


def airy_per_arcsec2(r2_arcsec2: np.ndarray, *, lambda_over_d_arcsec: float,
                      obscuration: float) -> np.ndarray:
    """Unit-flux obscured Airy pattern per arcsec^2 at squared radius `r2_arcsec2`."""
    x = np.pi * np.sqrt(np.maximum(r2_arcsec2, 1e-24)) / lambda_over_d_arcsec
    e = obscuration
    amp = 2.0 * special.j1(x) / x
    if e > 0:
        amp = (amp - e * e * 2.0 * special.j1(e * x) / (e * x)) / (1.0 - e * e)
    return (np.pi / 4.0) * (1.0 - e * e) * amp * amp / lambda_over_d_arcsec**2


#: Samples per lambda/D of the pattern's radial table (`_airy_interpolated`), and its reach.
_AIRY_TABLE_PER_LOD = 4000
_AIRY_TABLE_LODS = 24


@functools.lru_cache(maxsize=8)
def _airy_radial_table(lambda_over_d_arcsec: float, obscuration: float) -> np.ndarray:
    """`airy_per_arcsec2` at radii 0, 1, 2, ... in steps of lambda/D / `_AIRY_TABLE_PER_LOD`,
    out to `_AIRY_TABLE_LODS` lambda/D (read-only)."""
    step = lambda_over_d_arcsec / _AIRY_TABLE_PER_LOD
    r = np.arange(_AIRY_TABLE_LODS * _AIRY_TABLE_PER_LOD + 2) * step
    table = airy_per_arcsec2(r * r, lambda_over_d_arcsec=lambda_over_d_arcsec,
                             obscuration=obscuration)
    table.flags.writeable = False
    return table


def _airy_interpolated(r2_arcsec2: np.ndarray, *, lambda_over_d_arcsec: float,
                       obscuration: float) -> np.ndarray:
    """`airy_per_arcsec2`, interpolated linearly in radius in its fine table (the Bessel
    functions on every sub-pixel of every stamp were ~75% of an AOR's simulation time): off
    by < 1e-6 of the peak (tested); exact beyond the table's reach."""
    table = _airy_radial_table(lambda_over_d_arcsec, obscuration)
    t = np.sqrt(r2_arcsec2) * (_AIRY_TABLE_PER_LOD / lambda_over_d_arcsec)
    far = t >= table.size - 2
    i = np.minimum(t, table.size - 2).astype(np.int64)
    frac = t - i
    out = table[i] * (1.0 - frac) + table[i + 1] * frac
    if np.any(far):
        out[far] = airy_per_arcsec2(r2_arcsec2[far], lambda_over_d_arcsec=lambda_over_d_arcsec,
                                    obscuration=obscuration)
    return out


def gaussian_encircled_energy(radius_arcsec: float, fwhm_arcsec: float) -> float:
    """Fraction of a circular Gaussian PSF's flux within `radius_arcsec` (for aperture
    corrections on simulated data: the simulator's PSF is Gaussian, not the real MIPS PSF)."""
    sigma = fwhm_arcsec / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return 1.0 - math.exp(-(radius_arcsec**2) / (2.0 * sigma**2))
