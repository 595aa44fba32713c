"""Seeded synthetic MIPS-24-like BCDs for the mosaic tests (truth kept alongside).

Point sources (Gaussian PSF integrated over pixels by 5x5 sub-sampling in each frame's
local pixel frame, from the astropy WCS incl. SIP) on a smooth sky gradient, rendered onto
dithered 128x128 TAN-SIP frames from `mips.wcs_keywords`, with noise, cosmic rays and
per-frame additive offsets. Independent of services.mosaic (it uses astropy's WCS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from shared.bcd import BCDFrame
from shared.instruments import mips

RA0, DEC0 = 150.0, 2.2


@dataclass
class Truth:
    ra_deg: np.ndarray
    dec_deg: np.ndarray
    flux_ujy: np.ndarray
    offsets: np.ndarray  #: MJy/sr added to each frame
    cosmic: list[tuple[int, int, int]]  #: (frame, y, x) of unflagged cosmic rays
    noise_mjysr: float
    sky0_mjysr: float
    sky_grad_per_arcsec: tuple[float, float]

    def sky(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        dx = (ra - RA0) * math.cos(math.radians(DEC0)) * 3600.0
        dy = (dec - DEC0) * 3600.0
        return self.sky0_mjysr + self.sky_grad_per_arcsec[0] * dx + self.sky_grad_per_arcsec[1] * dy


def make_frames(
    n_frames: int = 24,
    *,
    seed: int = 1,
    dither_arcsec: float = 60.0,
    pa_deg: float | None = None,
    noise_mjysr: float = 0.05,
    offsets_sigma: float = 0.25,
    sources: list[tuple[float, float, float]] | None = None,
    n_cosmic: int = 20,
    first_dcenum: int = 1,
    sky0_mjysr: float = 20.0,
    sky_grad_per_arcsec: tuple[float, float] = (2e-4, -1e-4),
    psf_fwhm_arcsec: float = 5.9,
) -> tuple[list[BCDFrame], Truth]:
    """`sources` are (dx_arcsec, dy_arcsec, flux_ujy) from the field centre (RA0, DEC0)."""
    rng = np.random.default_rng(seed)
    band = mips.BANDS[1]
    if sources is None:
        sources = [
            (0.0, 0.0, 2.0e5),
            (-70.0, 45.0, 5.0e4),
            (80.0, -60.0, 1.0e5),
            (40.0, 90.0, 3.0e4),
            (-95.0, -85.0, 8.0e4),
        ]
    cosd = math.cos(math.radians(DEC0))
    ra_s = np.array([RA0 + s[0] / 3600.0 / cosd for s in sources])
    dec_s = np.array([DEC0 + s[1] / 3600.0 for s in sources])
    flux = np.array([s[2] for s in sources])
    truth = Truth(
        ra_s,
        dec_s,
        flux,
        rng.normal(0.0, offsets_sigma, n_frames),
        [],
        noise_mjysr,
        sky0_mjysr,
        sky_grad_per_arcsec,
    )
    sig_arcsec = psf_fwhm_arcsec / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sub = (np.arange(5) + 0.5) / 5.0 - 0.5
    frames = []
    for i in range(n_frames):
        ra_c = RA0 + rng.uniform(-dither_arcsec, dither_arcsec) / 3600.0 / cosd
        dec_c = DEC0 + rng.uniform(-dither_arcsec, dither_arcsec) / 3600.0
        pa = float(rng.uniform(0, 360)) if pa_deg is None else pa_deg
        h = fits.Header()
        h["NAXIS"] = 2
        h["NAXIS1"] = band.ncols
        h["NAXIS2"] = band.nrows
        h["TELESCOP"] = mips.TELESCOP
        h["INSTRUME"] = mips.INSTRUME
        h["CHNLNUM"] = 1
        h["AORKEY"] = 12345678
        h["EXPID"] = i // 3
        h["DCENUM"] = first_dcenum + i % 3 if first_dcenum >= 0 else i % 3
        h["EXPTIME"] = 9.96
        h["BUNIT"] = "MJy/sr"
        h.update(mips.wcs_keywords(1, ra_deg=ra_c, dec_deg=dec_c, pa_deg=pa))
        w = WCS(h)
        yy, xx = np.mgrid[0 : band.nrows, 0 : band.ncols]
        ra, dec = w.all_pix2world(xx, yy, 0)
        img = truth.sky(ra, dec)
        var_src = np.zeros_like(img)
        for k in range(len(flux)):
            px, py = w.all_world2pix(ra_s[k], dec_s[k], 0)
            px, py = float(px), float(py)
            if not (-15 < px < band.ncols + 15 and -15 < py < band.nrows + 15):
                continue
            # local Jacobian (pixel -> arcsec on the sky) at the source, SIP included
            eps = 0.5
            r1, d1 = w.all_pix2world([px - eps, px + eps, px, px], [py, py, py - eps, py + eps], 0)
            jac = (
                np.array(
                    [
                        [(r1[1] - r1[0]) * cosd, (r1[3] - r1[2]) * cosd],
                        [d1[1] - d1[0], d1[3] - d1[2]],
                    ]
                )
                * 3600.0
                / (2 * eps)
            )
            omega_sr = abs(np.linalg.det(jac)) * mips.SR_PER_ARCSEC2
            x0, x1 = max(0, int(px) - 14), min(band.ncols, int(px) + 15)
            y0, y1 = max(0, int(py) - 14), min(band.nrows, int(py) + 15)
            if x0 >= x1 or y0 >= y1:
                continue
            cy, cx = np.mgrid[y0:y1, x0:x1]
            sx = cx[..., None, None] + sub[None, None, None, :] - px
            sy = cy[..., None, None] + sub[None, None, :, None] - py
            ex = jac[0, 0] * sx + jac[0, 1] * sy
            ey = jac[1, 0] * sx + jac[1, 1] * sy
            g = np.exp(-0.5 * (ex**2 + ey**2) / sig_arcsec**2) / (2 * math.pi * sig_arcsec**2)
            frac = g.mean(axis=(2, 3)) * abs(np.linalg.det(jac))  # PSF fraction per pixel
            sb = flux[k] * 1e-12 * frac / omega_sr
            img[y0:y1, x0:x1] += sb
            var_src[y0:y1, x0:x1] += 0.01 * noise_mjysr * sb
        unc = np.sqrt(noise_mjysr**2 + var_src)
        data = img + rng.normal(0.0, 1.0, img.shape) * unc + truth.offsets[i]
        mask = np.zeros(img.shape, dtype=np.int32)
        for _ in range(n_cosmic):
            cyx = (int(rng.integers(0, band.nrows)), int(rng.integers(0, band.ncols)))
            data[cyx] += rng.uniform(50, 500) * noise_mjysr
            truth.cosmic.append((i, *cyx))
        # a few cosmic rays that calibrate found: flagged, with garbage values
        for _ in range(3):
            cyx = (int(rng.integers(0, band.nrows)), int(rng.integers(0, band.ncols)))
            data[cyx] += 1e4
            mask[cyx] |= int(mips.MaskBit.RADHIT)
        frames.append(
            BCDFrame(
                data=data.astype(np.float32),
                unc=unc.astype(np.float32),
                mask=mask,
                header=h,
                key=mips.bcd_name(1, 12345678, i // 3, int(h["DCENUM"]), 1, "bcd"),
            )
        )
    return frames, truth
