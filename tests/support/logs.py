"""What the agent logged, from pytest's ``caplog``."""

from __future__ import annotations

import logging


def gradwatch_warnings(caplog) -> list[str]:
    """The messages of gradwatch's loggers at WARNING and above."""
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("gradwatch") and r.levelno >= logging.WARNING]
