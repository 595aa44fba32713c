"""TAUVEX point sources: per-filter source lists (EXT_PS) and the band-merged T1-T3 list."""

from services.extract.tauvex.bandmerge import band_merge
from services.extract.tauvex.photometry import (
    detect_sources,
    forced_photometry,
    table_to_fits,
    table_to_ipac,
)

__all__ = ["band_merge", "detect_sources", "forced_photometry", "table_to_fits", "table_to_ipac"]
