"""Outcome taxonomy: what a service raises, and what the runtime does next.

- `Skip`: nothing to do for this message (by design) -> ack; the reason is logged.
- `BadData`: input that can never succeed (corrupt, invalid) -> dead letter with the reason; term.
- `Transient`: a dependency failed for now (store, bus) -> nak with back-off; retried.
- any other error: a bug -> logged with traceback; nak with back-off; dead-lettered after
  `max_deliver` attempts.

Science code raises `ValueError` (or a subclass) for bad input; the service boundary turns it
into `BadData`. Only the runtime catches.
"""

from __future__ import annotations


class SkybusError(Exception):
    """Base of skybus's own errors."""


class Skip(SkybusError):
    """Nothing to do for this message; it is acknowledged and the reason logged."""


class BadData(SkybusError):
    """The input can never be processed: it goes to the dead-letter subject with this reason."""


class Transient(SkybusError):
    """A temporary failure: the message is retried after a back-off."""


class ConfigError(SkybusError):
    """Wrong configuration, found at start-up; the message names the field."""


class StoreKeyError(ValueError):
    """An object-store key that is not allowed (absolute, `..`, empty parts)."""
