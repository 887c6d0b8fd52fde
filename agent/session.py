"""A session: one stream of gradients with a fixed variable table.

Usually one wrapped optimizer in one task (or one ``observe`` call site). The
training thread calls `Session.record`; the sender thread calls
`Session.drain` and `Session.registration`. They share only the on-device
ring buffer and a lock-protected list of host-side reports.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch.agent.diagnosis import Diagnosis
from gradwatch.agent.identity import Identity
from gradwatch.agent.recorder import StepRecorder
from gradwatch.agent.stats import gradient_stats
from gradwatch.proto.v1 import gradwatch_pb2 as pb

log = logging.getLogger(__name__)


def variable_name(variable: Any) -> str:
    """Keras 3 variables have a unique ``path``; tf.Variables a ``name`` ending in ``:0``."""
    name = getattr(variable, "path", None) or getattr(variable, "name", None) or "variable"
    return name[:-2] if name.endswith(":0") else name


def variable_table(variables: Sequence[Any]) -> list[pb.Variable]:
    """Proto variable table; duplicate names get a ``#n`` suffix so ids stay distinct."""
    seen: dict[str, int] = {}
    table = []
    for variable in variables:
        name = variable_name(variable)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        shape = [-1 if d is None else int(d) for d in getattr(variable, "shape", [])]
        dtype = getattr(variable, "dtype", "")
        table.append(pb.Variable(name=name, shape=shape, dtype=getattr(dtype, "name", str(dtype))))
    return table


def step_report(step: int, stats: np.ndarray, wall_time: float) -> pb.StepReport:
    """Packs a ``[num_replicas, num_variables, NUM_COLUMNS]`` array into a StepReport."""
    present, l2_norm, max_abs, nan, inf = (stats[..., c].reshape(-1) for c in range(5))
    return pb.StepReport(
        step=int(step),
        wall_time=wall_time,
        present=(present > 0).astype(np.uint8).tobytes(),
        l2_norm=l2_norm.astype("<f4").tobytes(),
        max_abs=max_abs.astype("<f4").tobytes(),
        nan_count=nan.astype("<f4").tobytes(),
        inf_count=inf.astype("<f4").tobytes(),
    )


def diagnosis_proto(variable_id: int, diagnosis: Diagnosis) -> pb.Diagnosis:
    source = diagnosis.source
    return pb.Diagnosis(
        variable_id=variable_id,
        cause=pb.Diagnosis.Cause.Value(diagnosis.cause.name),
        op_name=diagnosis.op_name,
        op_type=diagnosis.op_type,
        source_file=source.file if source else "",
        source_line=source.line if source else 0,
        reason=diagnosis.reason,
        hint=diagnosis.hint,
        message=diagnosis.explanation(),
    )


class Session:
    """Records one optimizer's gradients; see the module docstring for threading."""

    def __init__(self, identity: Identity, optimizer: str, variables: Sequence[Any],
                 capacity: int, strategy: tf.distribute.Strategy,
                 versions: dict[str, str] | None = None, loss_scaled: bool = False):
        """Create in cross-replica context (see `StepRecorder`)."""
        self.optimizer = optimizer
        self.num_variables = len(variables)
        self._recorder = StepRecorder(self.num_variables, capacity,
                                      name=f"gradwatch_{optimizer}", strategy=strategy)
        self._request = pb.RegisterRequest(
            training_job=identity.training_job,
            task_type=identity.task_type,
            task_index=identity.task_index,
            num_replicas=self._recorder.num_replicas,
            strategy=type(strategy).__name__,
            optimizer=optimizer,
            versions=versions or {},
            variables=variable_table(variables),
            hostname=identity.hostname,
            pid=identity.pid,
            loss_scaled=loss_scaled,
        )
        # TensorFlow counts traces per code object; a partial is counted per session,
        # so many sessions (each traced once or twice) don't look like "retracing".
        self._record = tf.function(functools.partial(self._record_step), autograph=False)
        self._lock = threading.Lock()
        self._host_reports: list[pb.StepReport] = []
        self._ids_by_object = {}
        self._ids_by_name = {}
        for index, variable in enumerate(variables):
            self._ids_by_object.setdefault(id(variable), index)
            self._ids_by_name.setdefault(variable_name(variable), index)
        self._diagnoses: dict[int, pb.Diagnosis] = {}

    @property
    def num_replicas(self) -> int:
        return self._recorder.num_replicas

    def _record_step(self, grads: list, step: tf.Tensor | None,
                     loss_scale: tf.Tensor | None) -> tf.Operation:
        stats = gradient_stats(grads)
        if loss_scale is not None:  # report what the optimizer will apply: g / scale
            inverse = 1.0 / tf.cast(loss_scale, tf.float32)
            stats = stats * tf.stack([1.0, inverse, inverse, 1.0, 1.0])
        return self._recorder.record(stats, step)

    def record(self, grads: Sequence[Any], step: Any = None, loss_scale: Any = None) -> None:
        """Records one step: in replica context (or without a strategy), eagerly,
        while tracing, or compiled. Eager calls go through a cached tf.function.
        ``loss_scale``: the factor the gradients are scaled by (mixed precision)."""
        if tf.inside_function():
            self._record_step(list(grads), step, loss_scale)
        else:
            self._record(list(grads), step, loss_scale)

    def record_on_host(self, step: int, grads: Sequence[Any]) -> None:
        """Records a step that will never execute (e.g. the optimizer rejected it while
        tracing): only gradient presence is known, from the Python objects."""
        stats = np.zeros((self._recorder.num_replicas, len(grads), 5), np.float32)
        stats[:, :, 0] = [g is not None for g in grads]
        with self._lock:
            self._host_reports.append(step_report(step, stats, time.time()))

    def add_diagnosis(self, variable: Any, diagnosis: Diagnosis) -> bool:
        """Keeps why ``variable`` gets no gradient, if it is one of ours (any thread)."""
        index = self._ids_by_object.get(id(variable))
        if index is None:
            index = self._ids_by_name.get(variable_name(variable))
        if index is None:
            return False
        with self._lock:
            self._diagnoses[index] = diagnosis_proto(index, diagnosis)
        return True

    def diagnoses(self) -> dict[int, pb.Diagnosis]:
        """The latest diagnosis per variable id (sender thread)."""
        with self._lock:
            return dict(self._diagnoses)

    def registration(self) -> pb.RegisterRequest:
        return self._request

    def drain(self) -> tuple[list[pb.StepReport], int]:
        """New step reports and the count of steps dropped since the last call
        (sender thread only)."""
        recorded = self._recorder.read_new()
        now = time.time()
        reports = [step_report(s, stats, now)
                   for s, stats in zip(recorded.steps, recorded.stats, strict=True)]
        with self._lock:
            host, self._host_reports = self._host_reports, []
        if host:  # a step refused while tracing is reported ahead of the device's steps
            reports = sorted(host + reports, key=lambda r: r.step)
        return reports, recorded.dropped
