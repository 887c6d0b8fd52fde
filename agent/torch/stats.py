"""Gradient statistics on the gradients' device, without host synchronisation.

`measure` reads each gradient once: its L2 norm from ``torch._foreach_norm``, one
multi-tensor kernel per (device, dtype) group (float32 accumulation for float16, bfloat16 and
float32 gradients; float64 and complex ones in their own precision), so the cost is a
few launches per step, not one per parameter. A non-finite gradient shows in its norm
(NaN or Inf).

NaN and Inf elements (`counts_exactly`): on the CPU, where looking at a value costs no
synchronisation, a non-finite norm triggers the rare path: exact NaN and Inf counts, and
the norm in float64 when a finite gradient overflowed float32. On an accelerator the
step never waits for the device, so it measures the norms alone, and the host marks
the variables whose norm is not finite (`gradwatch.agent.core.record.from_norms`):
which variables went bad on which rank is exact, how many elements is not
(docs/pytorch.md).

Measures are ``[width(device), K]``: the norms, then on the CPU the NaN and Inf counts
(the rows of a `gradwatch.agent.core.record`). `RecordBuilder` assembles one step's
``[width, N]`` record on a session's device from measured parts, absent variables
included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradwatch.agent.core.record import ABSENT, RECORD_WIDTH


def counts_exactly(device: torch.device) -> bool:
    """Whether NaN and Inf elements are counted on ``device``: only on the CPU, where the
    step may look at a value without waiting for a device."""
    return device.type == "cpu"


def width(device: torch.device) -> int:
    """Rows of a measure on ``device``: norms, then NaN and Inf counts where counted."""
    return RECORD_WIDTH if counts_exactly(device) else 1


#: Gradients whose norms accumulate in float32; the others (float64, complex) in their own
#: precision, and are then rounded to float32.
_NARROW = frozenset({torch.float16, torch.bfloat16, torch.float32})


def _foreach_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """float32 L2 norms of dense ``tensors``, in order, one multi-tensor kernel per
    (device, dtype) group. float16, bfloat16 and float32 tensors, the common case, cost
    no Python work per tensor; float64 and complex ones cannot narrow to float32 in the
    kernel, so a model with any takes one more pass to group them."""
    try:
        return torch._foreach_norm(tensors, 2, dtype=torch.float32)
    except RuntimeError:
        if all(t.dtype in _NARROW for t in tensors):
            raise
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    for narrow in (True, False):
        group = [k for k, t in enumerate(tensors) if (t.dtype in _NARROW) == narrow]
        if group:
            found = torch._foreach_norm([tensors[k] for k in group], 2,
                                        dtype=torch.float32 if narrow else None)
            for k, norm in zip(group, found, strict=True):
                norms[k] = norm.float()
    return norms


def _norm(values: torch.Tensor) -> torch.Tensor:
    """float32 L2 norm of one tensor, accumulated as `_foreach_norms` does."""
    if values.dtype in _NARROW:
        return torch.linalg.vector_norm(values, dtype=torch.float32)
    return torch.linalg.vector_norm(values).float()


def _norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float32 L2 norms of ``tensors`` on ``device``, in order (see `_foreach_norms`)."""
    if not any(t.is_sparse for t in tensors):
        found = _foreach_norms(tensors)
        try:
            return torch.stack(found).to(device, non_blocking=True)
        except RuntimeError:  # norms on several devices (a model split across devices)
            return torch.stack([n.to(device, non_blocking=True) for n in found])
    # nn.Embedding(sparse=True): the norm of the summed rows; the dense ones as above
    dense = [k for k, t in enumerate(tensors) if not t.is_sparse]
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    if dense:
        for k, norm in zip(dense, _norms([tensors[k] for k in dense], device), strict=True):
            norms[k] = norm
    for k, t in enumerate(tensors):
        if t.is_sparse:
            norms[k] = _norm(t.coalesce().values()).to(device)
    return torch.stack(norms)


#: Elements counted at once on the rare path (a copy of that many, at most, at a time).
_COUNTED_TOGETHER = 1 << 24


def _counts(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN and Inf counts of each of the flat ``values``: a few ops per
    `_COUNTED_TOGETHER` elements, not per tensor (a diverged model has every gradient NaN
    at every step)."""
    nan, inf, start = [torch.zeros(0)], [torch.zeros(0)], 0
    while start < len(values):
        end, size = start + 1, values[start].numel()
        while end < len(values) and size + values[end].numel() <= _COUNTED_TOGETHER:
            size += values[end].numel()
            end += 1
        part = values[start:end]
        if len(part) == 1:
            nan.append(torch.isnan(part[0]).sum().reshape(1).float())
            inf.append(torch.isinf(part[0]).sum().reshape(1).float())
        else:
            flat = torch.cat(part)
            segments = torch.repeat_interleave(torch.arange(len(part)),
                                               torch.tensor([v.numel() for v in part]))
            for counts, found in ((nan, torch.isnan(flat)), (inf, torch.isinf(flat))):
                counts.append(torch.zeros(len(part)).index_add_(0, segments, found.float()))
        start = end
    return torch.cat(nan), torch.cat(inf)


def _exact(tensors: Sequence[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """The rare path on the CPU: exact counts, and float64 norms where float32 overflowed."""
    nan = torch.zeros_like(norms)
    inf = torch.zeros_like(norms)
    norms = norms.clone()
    bad = torch.nonzero(~torch.isfinite(norms)).flatten()
    values = [(t.coalesce().values() if t.is_sparse else t).reshape(-1)
              for t in (tensors[k] for k in bad.tolist())]
    nan[bad], inf[bad] = _counts(values)
    overflowed = ((nan[bad] == 0) & (inf[bad] == 0)).tolist()  # finite, too large for float32
    for k, v, wide in zip(bad.tolist(), values, overflowed, strict=True):
        if wide:
            norms[k] = _norm(v.to(torch.complex128 if v.is_complex() else torch.float64))
    return torch.stack([norms, nan, inf])


def measure(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[width(device), len(tensors)]`` float32 on ``device``: norms, then on the CPU NaN
    counts and Inf counts. Never part of an autograd graph, whatever the gradients carry."""
    if not tensors:
        return torch.zeros((width(device), 0), device=device)
    norms = _norms(tensors, device)
    if norms.requires_grad:  # gradients with a graph (backward(create_graph=True)), rare
        return measure([t.detach() for t in tensors], device)
    if not counts_exactly(device):
        return norms.view(1, -1)  # no kernel: the host marks what is not finite
    if math.isfinite(norms.sum()):  # synchronous anyway: look (norms are not negative)
        return torch.nn.functional.pad(norms, (0, 2 * len(norms))).view(RECORD_WIDTH, -1)
    return _exact(tensors, norms)


class RecordBuilder:
    """``[width(device), N]`` records of one session's N variables on ``device``.
    Thread-safety: one caller at a time (the training thread)."""

    def __init__(self, num_variables: int, device: torch.device) -> None:
        self.num_variables = num_variables
        self.device = device
        self.width = width(device)
        self._in_order = list(range(num_variables))
        self._index: dict[tuple, torch.Tensor] = {}
        self._tail = torch.tensor([ABSENT, 0.0], device=device)  # what absent ones read
        self._absent = torch.tensor([[ABSENT] * num_variables]
                                    + [[0.0] * num_variables] * (self.width - 1), device=device)

    def __call__(self, parts: Sequence[tuple[Sequence[int], torch.Tensor]],
                 absent: frozenset[int] = frozenset()) -> torch.Tensor:
        """The record from measured ``parts``: (variable ids, their ``[width, K]``
        measures). Variables in no part, or in ``absent`` (measured, but without a
        gradient), are absent."""
        if len(parts) == 1 and not absent and parts[0][0] == self._in_order:
            return parts[0][1]  # every variable measured, in order: the record
        order = tuple(i for ids, _ in parts for i in ids)
        if not order or set(order) <= absent:
            return self._absent
        measured = torch.cat([m for _, m in parts], 1) if len(parts) > 1 else parts[0][1]
        key = (order, absent)
        index = self._index.get(key)
        if index is None:  # once per pattern of present variables: no copy per step
            index = self._index[key] = self._make_index(order, absent)
        padded = torch.cat([measured.reshape(-1), self._tail])
        return padded.index_select(0, index).view(self.width, -1)

    def _make_index(self, order: tuple[int, ...], absent: frozenset[int]) -> torch.Tensor:
        """Where each entry of the record is in ``[measures of order (row by row), ABSENT,
        0]``."""
        n, p = self.num_variables, len(order)
        where = {i: k for k, i in enumerate(order) if i not in absent}
        tail = self.width * p
        index = []
        for row in range(self.width):  # norms, then NaN, then Inf counts
            for i in range(n):
                k = where.get(i)
                index.append((tail if row == 0 else tail + 1) if k is None else row * p + k)
        return torch.tensor(index, dtype=torch.long, device=self.device)
