"""skybus: services.mosaic — post-BCD mosaicking (overlap, outliers, resampling, coadd)."""

from services.mosaic.coadd import (
    InconsistentFramesError,
    Mosaic,
    MosaicError,
    NoUsableFramesError,
    build_mosaic,
)
from services.mosaic.pbcd import mosaic_hdus
from shared.quicklook import quicklook_png

__all__ = [
    "InconsistentFramesError",
    "Mosaic",
    "MosaicError",
    "NoUsableFramesError",
    "build_mosaic",
    "mosaic_hdus",
    "quicklook_png",
]
