"""Point-source extraction: APEX-like source lists, forced upper limits and band-merging."""

from services.extract.bandmerge import BandmergeError, bandmerge
from services.extract.photometry import ExtractionError, extract_sources
from services.extract.tables import (
    from_fits_bytes,
    from_fits_hdulist,
    from_ipac_bytes,
    to_fits_bytes,
    to_fits_hdulist,
    to_ipac_bytes,
)
from services.extract.upperlimits import UpperLimitError, forced_upper_limits

__all__ = [
    "BandmergeError",
    "ExtractionError",
    "UpperLimitError",
    "bandmerge",
    "extract_sources",
    "forced_upper_limits",
    "from_fits_bytes",
    "from_fits_hdulist",
    "from_ipac_bytes",
    "to_fits_bytes",
    "to_fits_hdulist",
    "to_ipac_bytes",
]
