"""ISOCAM decode (Derive_ERD): CTDF observation slices -> CIER edited raw data."""

from services.decode.isocam.erd import CIER_COLUMNS, derive_erd

__all__ = ["CIER_COLUMNS", "derive_erd"]
