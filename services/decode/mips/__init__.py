"""MIPS decode: telemetry packets of one DCE -> the Spitzer raw product (FITS)."""

from services.decode.mips.decode import decode_dce, raw_product_name
from services.decode.mips.telemetry import DceDescriptor, MipsTelemetryError

__all__ = ["DceDescriptor", "MipsTelemetryError", "decode_dce", "raw_product_name"]
