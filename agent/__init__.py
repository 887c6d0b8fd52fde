"""The gradwatch agent: runs inside training and reports gradient statistics.

``gradwatch.agent.core`` is framework-neutral (settings, identity, transport,
buffering); each front end builds on it: ``gradwatch.agent.tensorflow`` (also
importable from here, as ``from gradwatch.agent import GradientMonitor``) and
``gradwatch.agent.torch``. Nothing here imports a framework until a front end's
name is used. Never imports prometheus_client or the collector.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GradientMonitor", "diagnose_missing_gradients"]


def __getattr__(name: str) -> Any:
    """The TensorFlow front end's public names, imported on first use."""
    if name in __all__:
        from gradwatch.agent import tensorflow

        return getattr(tensorflow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
