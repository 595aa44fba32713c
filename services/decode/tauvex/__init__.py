"""TAUVEX decode: Level 1 major frames -> Level 1a event tables (W, S, Z, VALIDITY)."""

from services.decode.tauvex.frames import DecodedEvents, decode_frames
from services.decode.tauvex.level1a import make_level1a
from services.decode.tauvex.validate import validity

__all__ = ["DecodedEvents", "decode_frames", "make_level1a", "validity"]
