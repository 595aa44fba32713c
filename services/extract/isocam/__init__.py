"""ISOCAM point sources (AAR): CMOS/CMAP -> CPSL point-source list."""

from services.extract.isocam.cpsl import (
    EffectivePsf,
    Photometry,
    aperture_photometry,
    effective_psf,
    extract_sources,
    forced_photometry,
)

__all__ = ["EffectivePsf", "Photometry", "aperture_photometry", "effective_psf",
           "extract_sources", "forced_photometry"]
