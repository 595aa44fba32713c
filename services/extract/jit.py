"""The extraction's compiled kernels (numba): their decorator, and their ahead-of-use
compilation.

Kernels: the PRF fits, the tabulated PRF's stamps and far wings (`prf_kernels`), the
background mesh statistics (`background._clipped_sorted_rows`) and the exact apertures
(`photometry._aperture_sums`). Compiling them takes ~35-50 s on the 2-core bench machine
(50.7 s measured on a slow afternoon, when the kernels before the tabulated-PRF fit took
44 s); the machine code is cached on disk (beside the sources, or in NUMBA_CACHE_DIR), so
later processes load it in well under a second."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from numba import njit


def kernel(fn: Callable[..., Any]) -> Any:
    """numba nopython, GIL released, machine code cached on disk; where no cache directory is
    writable (a read-only root file system without NUMBA_CACHE_DIR), compiled per process."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


def compile_kernels() -> float:
    """Run every kernel once on a small synthetic image, so that its compilation (or the load
    of its on-disk cache) happens now and not inside the first extraction; returns the
    seconds it took."""
    import numpy as np

    from services.extract.background import estimate_background
    from services.extract.photometry import aperture_fluxes
    from services.extract.prf import fit_common_fwhm, fit_point_sources
    from services.extract.prfmodel import wing_image

    t0 = time.perf_counter()
    yy, xx = np.mgrid[0:40, 0:40]
    x0 = np.array([12.3, 14.9, 27.6, 20.0, 30.2])
    y0 = np.array([11.8, 13.1, 26.4, 30.5, 9.7])
    flux = np.array([100.0, 60.0, 80.0, 50.0, 70.0])
    image = sum(f / (2 * np.pi * 1.2**2) * np.exp(-((xx - a) ** 2 + (yy - b) ** 2) / 2.88)
                for a, b, f in zip(x0, y0, flux, strict=True))
    weight = np.ones((40, 40))
    fit_common_fwhm(image, weight, x0=x0, y0=y0, flux0=flux, fwhm_px=2.5, half_size=5,
                    reject_factor=5.0)
    fit_point_sources(image, weight, x0=x0 + 0.3, y0=y0 - 0.2, flux0=flux, fwhm_px=2.8)
    from services.extract.prf import TabulatedPrf

    yo, xo = np.mgrid[-12:13, -12:13] / 3.0
    gauss = np.exp(-(xo**2 + yo**2) / 2.88)
    tabulated = TabulatedPrf(gauss / gauss.sum() * 9.0, oversample=3, name="warm-up")
    fit_point_sources(image, weight, x0=x0, y0=y0, flux0=flux, fwhm_px=2.8, prf=tabulated)
    wing_image(tabulated, x=x0, y=y0, flux=flux, shape=image.shape, core_half=2)
    tabulated.stamps(x0 - 3, y0 - 3, 7, np.ones((5, 7)), np.ones((5, 7)))  # SkyPsf's
    estimate_background(image, box_px=10)
    aperture_fluxes(image, weight, x=x0, y=y0, radius_px=3.0, mask=weight == 0)
    aperture_fluxes(image, weight, x=x0, y=y0, radius_px=3.0)
    return time.perf_counter() - t0
