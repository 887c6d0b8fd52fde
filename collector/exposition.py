"""Prometheus text exposition (format 0.0.4), written a column at a time.

prometheus_client formats one sample at a time, several microseconds each;
a collector exporting 100,000 per-variable series needs whole numpy columns
formatted at once. A `Family` holds one metric's lines; label sets are
rendered once per series (`labels`) and values come from columns
(`Family.add_column`). The output is what client_python writes, so
Prometheus, promtool and client_python's parser read it the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

#: The ``Content-Type`` of what `render` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str) -> str:
    """A label value as the text format wants it between quotes."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def labels(names: Sequence[str], values: Sequence[object]) -> str:
    """``name="value",...`` sorted by name (as client_python writes them), values escaped,
    ready to go between braces."""
    pairs = sorted(zip(names, values, strict=True))
    return ",".join(f'{n}="{escape(str(v))}"' for n, v in pairs)


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Family:
    """One metric family. ``kind`` is ``counter`` (samples get ``_total``), ``gauge`` or
    ``info`` (a gauge named ``_info`` whose value is 1)."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        suffix = {"counter": "_total", "info": "_info"}.get(kind, "")
        self.sample_name = name + suffix
        self.kind = "counter" if kind == "counter" else "gauge"
        self.help_text = help_text.replace("\\", r"\\").replace("\n", r"\n")
        self._lines: list[str] = []

    def add(self, label_text: str, value: float) -> None:
        self._lines.append(f"{self.sample_name}{{{label_text}}} {_value(value)}\n"
                           if label_text else f"{self.sample_name} {_value(value)}\n")

    def add_column(self, label_texts: Sequence[str], values: Sequence[float] | np.ndarray
                   ) -> None:
        """One sample per label set; ``values`` numbers, as many as label sets."""
        column = np.asarray(values, np.float64)
        if np.isfinite(column).all():
            name = self.sample_name
            self._lines.extend([f"{name}{{{text}}} {value!r}\n" for text, value in
                                zip(label_texts, column.tolist(), strict=True)])
        else:
            for text, value in zip(label_texts, column.tolist(), strict=True):
                self.add(text, value)

    def text(self) -> str:
        return (f"# HELP {self.sample_name} {self.help_text}\n"
                f"# TYPE {self.sample_name} {self.kind}\n" + "".join(self._lines))


def render(families: Iterable[Family]) -> bytes:
    return "".join(family.text() for family in families).encode()
