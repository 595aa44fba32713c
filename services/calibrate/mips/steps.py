"""The record one calibration step leaves in the product header (COMPLETE/SKIPPED + HISTORY)."""

from __future__ import annotations

from dataclasses import dataclass, field

COMPLETE = "COMPLETE"
SKIPPED = "SKIPPED"


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What a step did: header `keyword` = `status`, HISTORY `lines`, calibration file used.

    `keyword` is <= 8 characters (FITS); `calfile` is (header keyword, file name) or None.
    """

    keyword: str
    status: str
    lines: tuple[str, ...] = ()
    calfile: tuple[str, str] | None = None
    cards: dict[str, tuple[float | int | str | bool, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.keyword) > 8 or self.status not in (COMPLETE, SKIPPED):
            raise ValueError(f"bad step record {self.keyword}={self.status}")
