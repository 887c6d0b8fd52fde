"""A TensorFlow session: records one optimizer's gradients into an on-device ring buffer.

`TensorFlowSession.record` runs where the gradients are (eagerly, while tracing,
compiled, in replica context); the framework-neutral `Session` does the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from gradwatch.agent.core.identity import Identity
from gradwatch.agent.core.session import Session, ring_capacity
from gradwatch.agent.tensorflow.recorder import StepRecorder, replica_local_variable, row_bytes
from gradwatch.agent.tensorflow.stats import branch, gradient_record, unscale_record
from gradwatch.agent.tensorflow.variables import describe

#: One step's gradients (None where a variable got none), or a function returning them.
Gradients = Sequence[Any] | Callable[[], Sequence[Any]]

#: Eager steps are recorded by one traced function per pattern of missing gradients
#: (presence is fixed in a trace); past this many patterns (layer drop, stochastic
#: depth: up to 2^layers) further ones run op by op instead of tracing again.
MAX_EAGER_TRACES = 4


class TensorFlowSession(Session):
    """Create in cross-replica context (see `StepRecorder`)."""

    def __init__(self, identity: Identity, optimizer: str, variables: Sequence[Any],
                 capacity: int | None, strategy: tf.distribute.Strategy,
                 versions: Mapping[str, str] | None = None, loss_scaled: bool = False,
                 every: int = 1):
        """``capacity``: ring buffer rows (None: `ring_capacity`'s default); ``every``:
        record only the steps whose number is a multiple of it (the first included)."""
        recorder = StepRecorder(len(variables),
                                ring_capacity(row_bytes(len(variables)), capacity),
                                name=f"gradwatch_{optimizer}", strategy=strategy)
        super().__init__(identity, optimizer, [describe(v) for v in variables], recorder,
                         strategy=type(strategy).__name__, versions=versions,
                         loss_scaled=loss_scaled)
        self._recorder = recorder
        self._strategy = strategy
        self._every = every
        #: Steps given without a number (`observe` without ``step``) are numbered by this
        #: count of calls, per replica, from 0 like an optimizer's: every call counts,
        #: recorded or not.
        with tf.init_scope(), strategy.scope():
            self._calls = replica_local_variable(tf.constant(0, tf.int64),
                                                 f"gradwatch_{optimizer}_calls")
        # TensorFlow counts traces per code object; a partial is counted per session,
        # so many sessions (each traced once or twice) don't look like "retracing".
        self._record = tf.function(functools.partial(self._record_step), autograph=False)
        #: The statistics as one function per session (they read no variable, so replicas
        #: share it): a program tracing many updates per step (layer-wise training)
        #: traces them once, and each update adds one call to its graph, which graph
        #: optimisation and XLA inline.
        self._statistics = tf.function(functools.partial(gradient_record), autograph=False)
        self._eager_patterns: set[tuple[bool, ...]] = set()  # traced for eager steps

    def _outside_replicas(self) -> bool:
        """Whether this runs outside the replicas of the session's strategy: in its
        cross-replica context, or outside its scope (``strategy.run`` called from a
        ``tf.function`` without ``strategy.scope()``, as the tutorials write it)."""
        context = tf.distribute.get_replica_context()
        return context is None or context.strategy is not self._strategy

    def _record_step(self, grads: Gradients, step: tf.Tensor | None,
                     loss_scale: tf.Tensor | None, due: tf.Tensor | None = None
                     ) -> tf.Operation | tf.Tensor:
        def write() -> tf.Operation:
            # Eagerly (a pattern past MAX_EAGER_TRACES), op by op: no trace.
            statistics = self._statistics if tf.inside_function() else gradient_record
            record = statistics(grads() if callable(grads) else grads)
            if loss_scale is not None:  # report what the optimizer will apply: g / scale
                record = unscale_record(record, self._recorder.num_variables, loss_scale)
            return self._recorder.record(record, number)

        number = (tf.cast(step, tf.int64) if step is not None
                  else self._calls.assign_add(1, read_value=True) - 1)
        # Presence is fixed when the step is traced, so the recorded steps report it for
        # the others; the statistics of the others are not computed at all.
        conditions = [] if due is None else [due]
        if self._every != 1:
            conditions.append(tf.equal(number % self._every, 0))
        if not conditions:
            return write()
        recording = conditions[0] if len(conditions) == 1 else tf.logical_and(*conditions)

        def recorded() -> tf.Tensor:
            write()  # a stateful op: the branch runs it without returning it
            return tf.constant(True)

        return branch(recording, recorded, lambda: tf.constant(False))

    def record(self, grads: Gradients, step: Any = None, loss_scale: Any = None,
               due: Any = None) -> None:
        """Records one step: in replica context (or without a strategy), eagerly,
        while tracing, or compiled. Eager calls go through a cached tf.function.

        ``grads``: a list, or a function returning it, called only if the step is
        recorded (in a traced step: inside the branch that records it).
        ``step``: the step's number (default: the number of calls without one, from 0).
        ``loss_scale``: the factor the gradients are scaled by (mixed precision).
        ``due``: a boolean tensor; False skips this call (the optimizer applies nothing).

        In a strategy's cross-replica context (gradients reduced by the user, applied
        outside ``strategy.run``) every replica records the statistics of those
        gradients: already aggregated, the same for each.
        """
        if self._outside_replicas():
            grads = list(grads() if callable(grads) else grads)
            self._strategy.run(self.record, args=(grads, step, loss_scale, due))
            return
        if tf.inside_function():
            self._record_step(grads, step, loss_scale, due)
            return
        if due is not None and not bool(due):
            return
        grads = list(grads() if callable(grads) else grads)
        pattern = tuple(g is None for g in grads)
        if pattern in self._eager_patterns or len(self._eager_patterns) < MAX_EAGER_TRACES:
            self._eager_patterns.add(pattern)
            # (as tensors: a Python number is part of the trace's key, one trace a step)
            self._record(grads, _as_tensor(step, tf.int64), _as_tensor(loss_scale, tf.float32))
        else:
            self._record_step(grads, step, loss_scale)


def _as_tensor(value: Any, dtype: tf.DType) -> Any:
    """``value`` as a tensor of ``dtype`` if it is a Python number, else as it is."""
    return tf.constant(value, dtype) if isinstance(value, int | float) else value
