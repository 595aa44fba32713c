"""The many-skies study's confusion-bias predictor against an actual least-squares fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from tests.integration.skies import confusion_bias


@pytest.mark.parametrize(("dx", "dy", "ratio"), [(12.0, 0.0, 0.03), (-6.0, 9.0, 0.01),
                                                  (25.0, -20.0, 0.05)])
def test_confusion_bias_matches_a_gaussian_fit_to_the_blend(dx: float, dy: float,
                                                            ratio: float) -> None:
    """A single-Gaussian fit (flux, x, y) to a source plus a faint undetected neighbour moves
    by the predicted pull within 10% of the pull (first order in the flux ratio)."""
    fwhm = 18.0
    s = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    g = np.arange(-60.0, 60.5, 0.5)
    xx, yy = np.meshgrid(g, g)

    def gauss(x0: float, y0: float) -> np.ndarray:
        return np.asarray(np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)))

    blend = gauss(0.0, 0.0) + ratio * gauss(dx, dy)
    fit = optimize.least_squares(lambda p: (p[0] * gauss(p[1], p[2]) - blend).ravel(),
                                 x0=[1.0, 0.0, 0.0], xtol=1e-12, ftol=1e-12)
    be, bn = confusion_bias(np.array([0.0, dx]), np.array([0.0, dy]), np.array([1.0, ratio]),
                            np.array([True, False]), fwhm_arcsec=fwhm)
    pull = math.hypot(be[0], bn[0])
    assert pull > 0.01
    assert math.hypot(fit.x[1] - be[0], fit.x[2] - bn[0]) <= 0.1 * pull
    # A detected neighbour is deblended by the fit: no pull predicted.
    be2, bn2 = confusion_bias(np.array([0.0, dx]), np.array([0.0, dy]), np.array([1.0, ratio]),
                              np.array([True, True]), fwhm_arcsec=fwhm)
    assert be2[0] == 0.0 and bn2[0] == 0.0
