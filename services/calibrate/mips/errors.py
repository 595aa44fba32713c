"""Exceptions of the MIPS calibration: bad input data, each a `ValueError` (dead-lettered)."""

from __future__ import annotations


class MipsCalibrateError(ValueError):
    """Base class: the input cannot be calibrated as given; the message says what to fix."""


class RawProductError(MipsCalibrateError):
    """A raw DCE product is malformed: wrong shape, missing keyword, wrong channel.

    Raised when: a header keyword of the raw-product contract is missing or out of range, or
    the data cube does not have the shape of its channel. What next: the DCE is dead-lettered;
    re-decode it from telemetry (the decoder produced something calibrate cannot read).
    """

    def __init__(self, message: str, *, keyword: str | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword
