"""A session: one stream of gradient statistics with a fixed variable table.

Usually one optimizer in one task. The front end records each step's statistics
into a `StepSource` (its on-device ring buffer) from the training thread; the
sender thread calls `Session.drain`, `Session.registration` and
`Session.diagnoses`. Besides the source they share only a lock-protected list of
host-made reports and the diagnoses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from gradwatch.agent.core.diagnosis import Diagnosis
from gradwatch.agent.core.identity import Identity
from gradwatch.proto.layout import COLUMN, NUM_COLUMNS, pack_step, pack_steps
from gradwatch.proto.v1 import gradwatch_pb2 as pb


@dataclass(frozen=True)
class RecordedSteps:
    """Steps read from a front end's device buffer, oldest first."""

    steps: np.ndarray  # int64 [n]
    stats: np.ndarray  # float32 [n, num_replicas, num_variables, NUM_COLUMNS]
    dropped: int  # steps lost (overwritten before they were read) since the previous read

    @classmethod
    def none(cls, num_replicas: int, num_variables: int) -> RecordedSteps:
        """No new step: what most reads find, so sources make it once and return it."""
        return cls(np.zeros(0, np.int64),
                   np.zeros((0, num_replicas, num_variables, NUM_COLUMNS), np.float32), 0)


#: Device memory a front end's ring buffer takes per replica unless told otherwise.
DEVICE_BUFFER_BYTES = 4 * 2**20
MIN_BUFFER_STEPS, MAX_BUFFER_STEPS = 16, 1024


def ring_capacity(row_bytes: int, requested: int | None = None) -> int:
    """Rows of a device ring buffer: ``requested``, else as many rows of ``row_bytes`` as
    fit in `DEVICE_BUFFER_BYTES`, within [16, 1024]. At the default 0.25 s flush interval,
    16 rows hold 64 steps/s without drops, 1,024 rows 4,096 steps/s."""
    if requested is not None:
        return requested
    return max(MIN_BUFFER_STEPS, min(MAX_BUFFER_STEPS, DEVICE_BUFFER_BYTES // row_bytes))


class StepSource(Protocol):
    """Where a front end keeps recorded steps until the sender reads them."""

    num_replicas: int

    def read_new(self) -> RecordedSteps:
        """Steps recorded since the previous call (sender thread only)."""


class Variable(NamedTuple):
    """A watched variable as the front end describes it. ``key`` identifies the
    framework's object (its ``id()``), so diagnoses find it."""

    name: str
    shape: tuple[int, ...]  # -1 for unknown dimensions
    dtype: str
    key: int = 0


def variable_table(variables: Sequence[Variable]) -> list[pb.Variable]:
    """The proto variable table; a repeated name gets a ``#n`` suffix so names stay
    distinct (the collector refuses duplicates)."""
    seen: dict[str, int] = {}
    table = []
    for variable in variables:
        name = variable.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        table.append(pb.Variable(name=name, shape=list(variable.shape), dtype=variable.dtype))
    return table


class Session:
    """One optimizer's stream; see the module docstring for threads."""

    def __init__(self, identity: Identity, optimizer: str, variables: Sequence[Variable],
                 source: StepSource, *, strategy: str = "",
                 versions: Mapping[str, str] | None = None, loss_scaled: bool = False,
                 sharded: bool = False) -> None:
        self.optimizer = optimizer
        self.num_variables = len(variables)
        self.source = source
        self._request = pb.RegisterRequest(
            training_job=identity.training_job,
            task_type=identity.task_type,
            task_index=identity.task_index,
            num_replicas=source.num_replicas,
            strategy=strategy,
            optimizer=optimizer,
            versions=dict(versions or {}),
            variables=variable_table(variables),
            hostname=identity.hostname,
            pid=identity.pid,
            loss_scaled=loss_scaled,
            sharded=sharded,
        )
        self._lock = threading.Lock()
        self._host_reports: list[pb.StepReport] = []
        self._ids_by_key: dict[int, int] = {}
        self._ids_by_name: dict[str, int] = {}
        for index, variable in enumerate(variables):
            self._ids_by_key.setdefault(variable.key, index)
            self._ids_by_name.setdefault(variable.name, index)
        self._diagnoses: dict[int, pb.Diagnosis] = {}
        #: The session this one continues with a grown variable table (set by
        #: `MonitorCore.adopt`): it registers under the same name, which replaces that
        #: one at the collector, so it registers only once all of that one's steps are in;
        #: or it takes the place of one that never registered (`Buffer.drain`).
        self.predecessor: Session | None = None
        #: Steps of the sessions it replaced before the sender read them (counted as
        #: dropped: their tables changed faster than the collector took them).
        self.dropped_before = 0
        #: Its optimizer is gone (`close`): no more steps; the sender delivers what it
        #: recorded, says goodbye to the collector and forgets it.
        self.closed = False

    @property
    def num_replicas(self) -> int:
        return self.source.num_replicas

    def registration(self) -> pb.RegisterRequest:
        return self._request

    def record_presence(self, step: int, present: Sequence[bool]) -> None:
        """Records a step that never reaches the device buffer (e.g. the optimizer
        rejected it while tracing): only which gradients were present is known (any
        thread)."""
        stats = np.zeros((self.num_replicas, self.num_variables, NUM_COLUMNS), np.float32)
        stats[:, :, COLUMN["present"]] = present
        with self._lock:
            self._host_reports.append(pack_step(step, stats, time.time()))

    def add_diagnosis(self, key: int, name: str, diagnosis: Diagnosis) -> bool:
        """Keeps why the variable (by ``key``, else ``name``) gets no gradient, if it is
        one of ours (any thread)."""
        index = self._ids_by_key.get(key)
        if index is None:
            index = self._ids_by_name.get(name)
        if index is None:
            return False
        with self._lock:
            self._diagnoses[index] = diagnosis.to_proto(index)
        return True

    def unread_steps(self) -> int:
        """Steps recorded that the sender never read, for a session it never read (any
        thread): those a source can count without reading (``unread``), and those
        recorded on the host."""
        unread = getattr(self.source, "unread", None)
        with self._lock:
            return (unread() if unread is not None else 0) + len(self._host_reports)

    def close(self) -> None:
        """Its optimizer is gone (`MonitorCore.release`): it takes no more steps."""
        self.closed = True

    def variable_keys(self) -> set[int]:
        """The keys (``id()``) of its variables."""
        return set(self._ids_by_key)

    def diagnoses(self) -> dict[int, pb.Diagnosis]:
        """The latest diagnosis per variable id (sender thread)."""
        with self._lock:
            return dict(self._diagnoses)

    def drain(self) -> tuple[list[pb.StepReport], int]:
        """New step reports and the count of steps dropped since the last call
        (sender thread only)."""
        recorded = self.source.read_new()
        reports = pack_steps(recorded.steps, recorded.stats, time.time()) if len(
            recorded.steps) else []
        with self._lock:
            host, self._host_reports = self._host_reports, []
        if host:  # a step refused while tracing is reported ahead of the device's steps
            reports = sorted(host + reports, key=lambda r: r.step)
        return reports, recorded.dropped
