"""The spread of paired measurements: what every side-by-side benchmark reports."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def round_ratios(measured: Sequence[float], baseline: Sequence[float]
                 ) -> tuple[float, float, float]:
    """Median, lower and upper quartile of ``measured[i] / baseline[i]`` (rounds paired)."""
    ratios = sorted(m / b for m, b in zip(measured, baseline, strict=True))
    return (statistics.median(ratios), ratios[len(ratios) // 4],
            ratios[(3 * len(ratios)) // 4])
