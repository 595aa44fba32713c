"""TAUVEX Level 2: sky image per scan and telescope (flux, error, exposure, counts), quick-look."""

from services.mosaic.tauvex.image import Level2Image, exposure_map, make_level2, quicklook_png

__all__ = ["Level2Image", "exposure_map", "make_level2", "quicklook_png"]
