"""The gradient-flow heat map as a PNG: variables (rows, in model order) x recent steps
(columns), colour = log10 of the gradient norm on a viridis-like scale, with missing,
non-finite and not-yet-reported cells in their own colours.

Rendered with numpy and zlib (PNG is an 8-bit RGB image, each row filtered with "none");
no imaging library. The caller picks the rows (a page of variables).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from gradwatch.collector.history import MISSING, NO_DATA, ZERO

#: Colours, as hex for the page's legend and RGB for the image.
MISSING_COLOUR = "#e4572e"  # red-orange: no gradient
NONFINITE_COLOUR = "#ff00ff"  # magenta: NaN or Inf
NO_DATA_COLOUR = "#f2f2f2"  # not reported (yet) at that step
#: Viridis at 5 stops; cells are interpolated between them.
_SCALE = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                   [253, 231, 37]], np.float64)


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], np.uint8)


def scale_colours(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """RGB (uint8) of log10 norms on the scale from ``low`` to ``high``."""
    t = np.clip((values - low) / max(high - low, 1e-9), 0.0, 1.0) * (len(_SCALE) - 1)
    i = np.minimum(t.astype(np.int64), len(_SCALE) - 2)
    f = (t - i)[..., None]
    return (_SCALE[i] * (1 - f) + _SCALE[i + 1] * f).round().astype(np.uint8)


def value_range(cells: np.ndarray) -> tuple[float, float]:
    """log10 norm range of the finite cells (the legend's ends). Zero norms are left out
    (one variable at `ZERO` would squeeze every other into the top colour); they take
    the scale's lowest."""
    finite = cells[np.isfinite(cells) & (cells > ZERO)].astype(np.float64)
    if finite.size == 0:
        return -6.0, 0.0
    low, high = np.percentile(finite, [1, 99]) if finite.size > 100 else (
        finite.min(), finite.max())
    return float(low), float(max(high, low + 1e-3))


def render(cells: np.ndarray, cell_width: int, cell_height: int,
           low: float, high: float) -> bytes:
    """PNG of ``cells`` ``[steps, variables]`` (float16, history encoding), one block of
    ``cell_width`` x ``cell_height`` pixels per cell, variables as rows."""
    grid = cells.T.astype(np.float32)  # [variables, steps]
    rgb = scale_colours(np.where(np.isfinite(grid), grid, 0.0), low, high)
    rgb[np.isnan(grid)] = _rgb(NONFINITE_COLOUR)
    rgb[grid == np.float32(MISSING)] = _rgb(MISSING_COLOUR)
    rgb[grid == np.float32(NO_DATA)] = _rgb(NO_DATA_COLOUR)
    image = np.repeat(np.repeat(rgb, cell_height, axis=0), cell_width, axis=1)
    return encode_png(image)


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``image`` ``[height, width, 3]`` uint8."""
    height, width = image.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8),  # filter type 0 per row
                           image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
