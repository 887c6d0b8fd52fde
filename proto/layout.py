"""The statistics layout: what each step reports per replica and variable, and how it travels.

The one definition both sides import. An agent computes a ``[replicas, variables,
NUM_COLUMNS]`` float32 matrix per step, columns in `STATISTICS` order, and packs it
with `pack_step` (many at once: `pack_steps`); the collector unpacks a batch with
`unpack_steps` and checks each value against its statistic's `Kind`. Each statistic
travels in the ``StepReport`` field of the same name as one packed little-endian array,
replica-major.

Adding a statistic: a ``bytes`` field in ``StepReport`` (gradwatch.proto), an entry
here, the agents' computation, and what the collector does with it (see
docs/contributing.md).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.proto.v1 import gradwatch_pb2 as pb


class Kind(enum.Enum):
    """What values a statistic may take (checked by the collector)."""

    FLAG = "flag"  # 0 or 1, sent as uint8
    MAGNITUDE = "magnitude"  # >= 0; NaN and +Inf allowed (what a non-finite gradient gives)
    COUNT = "count"  # finite and >= 0 (float32: exact below 2**24)


@dataclass(frozen=True)
class Statistic:
    """One column: the ``StepReport`` field that carries it, and what it may hold."""

    name: str
    kind: Kind
    description: str

    @property
    def wire_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.kind is Kind.FLAG else "<f4")


STATISTICS: tuple[Statistic, ...] = (
    Statistic("present", Kind.FLAG, "1 if the variable had a gradient"),
    Statistic("l2_norm", Kind.MAGNITUDE, "L2 norm of the gradient (0 if absent)"),
    Statistic("nan_count", Kind.COUNT, "NaN elements of the gradient"),
    Statistic("inf_count", Kind.COUNT, "+-Inf elements of the gradient"),
)
COLUMNS: tuple[str, ...] = tuple(s.name for s in STATISTICS)
NUM_COLUMNS = len(STATISTICS)
#: Column index by statistic name, e.g. ``COLUMN["present"]``.
COLUMN: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}
#: Wire bytes of one replica x variable (all columns).
BYTES_PER_STATISTIC = sum(s.wire_dtype.itemsize for s in STATISTICS)


def pack_steps(steps: Sequence[int], stats: np.ndarray, wall_time: float
               ) -> list[pb.StepReport]:
    """StepReports from ``[steps, replicas, variables, NUM_COLUMNS]`` (any float dtype):
    each column converted once for all steps, then sliced per step."""
    if stats.shape[-1] != NUM_COLUMNS:
        raise ValueError(f"expected {NUM_COLUMNS} columns ({', '.join(COLUMNS)}), "
                         f"got {stats.shape[-1]}")
    stats = stats.reshape(len(steps), int(np.prod(stats.shape[1:-1])), NUM_COLUMNS)
    columns = []
    for i, statistic in enumerate(STATISTICS):
        column = stats[..., i]
        if statistic.kind is Kind.FLAG:
            column = column > 0
        columns.append((statistic.name, np.ascontiguousarray(column, statistic.wire_dtype)))
    return [pb.StepReport(step=int(step), wall_time=wall_time,
                          **{name: column[k].tobytes() for name, column in columns})
            for k, step in enumerate(steps)]


def pack_step(step: int, stats: np.ndarray, wall_time: float) -> pb.StepReport:
    """A StepReport from a ``[replicas, variables, NUM_COLUMNS]`` array (any float dtype)."""
    return pack_steps([step], stats[None], wall_time)[0]


class LayoutError(ValueError):
    """A packed array whose length does not match the variable table."""


_statistic_fields = operator.attrgetter(*COLUMNS)


def unpack_steps(steps: Sequence[pb.StepReport], num_replicas: int,
                 num_variables: int) -> dict[str, np.ndarray]:
    """Each statistic of ``steps`` as a ``[steps, replicas, variables]`` array in its wire
    dtype (read-only views of the messages' bytes). Raises `LayoutError` naming the
    first array of the wrong length."""
    width = num_replicas * num_variables
    # One pass over the messages (each field read is a copy out of the message).
    per_statistic = list(zip(*map(_statistic_fields, steps), strict=True)) or [()] * NUM_COLUMNS
    arrays = {}
    for statistic, chunks in zip(STATISTICS, per_statistic, strict=True):
        expected = width * statistic.wire_dtype.itemsize
        if any(len(chunk) != expected for chunk in chunks):
            i = next(i for i, chunk in enumerate(chunks) if len(chunk) != expected)
            raise LayoutError(
                f"steps[{i}].{statistic.name} has {len(chunks[i])} bytes; expected {expected} "
                f"({num_replicas} replicas x {num_variables} variables)")
        flat = np.frombuffer(b"".join(chunks), dtype=statistic.wire_dtype)
        arrays[statistic.name] = flat.reshape(len(chunks), num_replicas, num_variables)
    return arrays


def field_number(message: type, name: str) -> int:
    """The proto field number of ``message.name`` (for hand-written encoders)."""
    return message.DESCRIPTOR.fields_by_name[name].number
