"""structlog set-up: one canonical line per message, JSON off a TTY, readable on a TTY."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, level: str = "info", json: bool | None = None, stream: object = None) -> None:
    """Configure structlog once per process. `json=None` picks JSON unless stderr is a TTY."""
    out = stream or sys.stderr
    use_json = (not getattr(out, "isatty", lambda: False)()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(service: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose every line names the service."""
    return structlog.get_logger().bind(service=service)  # type: ignore[no-any-return]
