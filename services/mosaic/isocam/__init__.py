"""ISOCAM AAR maps: CCIM -> CMAP per pointing, CMOS raster mosaic (Jy), quick-look PNG."""

from services.mosaic.isocam.maps import (
    AarMaps,
    cmap_image,
    make_cmap,
    make_cmos,
    make_maps,
    mosaic_grid,
    quicklook_png,
)

__all__ = ["AarMaps", "cmap_image", "make_cmap", "make_cmos", "make_maps", "mosaic_grid",
           "quicklook_png"]
