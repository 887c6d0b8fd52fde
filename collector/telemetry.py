"""The collector's own counters (exported as ``gradwatch_collector_*``)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Telemetry:
    """Plain counters, written by the event loop and read at scrape time."""

    registrations: int = 0
    batches: int = 0
    duplicate_batches: int = 0
    step_reports: int = 0
    variable_statistics: int = 0
    #: (gRPC status code name, `Reason` value) → rejected messages (registrations and
    #: batches).
    rejected: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
