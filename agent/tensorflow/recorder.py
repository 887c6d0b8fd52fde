"""On-device ring buffer holding the records of a session's most recent steps.

The training step *writes* one row per step into TensorFlow variables (no host
work, no Python at run time, so ``tf.function`` and XLA are fine). The sender
thread *reads* new rows every flush interval. Neither side waits for the other:
if the host falls more than ``capacity`` steps behind, the oldest rows are
overwritten and counted as dropped.

Per replica: ``rows`` (float32 ``[capacity + 1, 3 N]``: one step's
`gradwatch.agent.tensorflow.stats.gradient_record` each, in its device encoding),
``steps`` (int64 ``[capacity + 1]``) and ``count`` (rows written so far). Row ``j``
lives in slot ``j % (capacity + 1)``. A step writes its row and step with one
scatter each, then increments ``count``: five ops, no branch. The reader copies
rows below ``count`` and then reads ``count`` again: a row whose slot the writer
may have reached meanwhile (``j < count - capacity``; the spare slot is the one
being written) is counted as dropped, never read torn.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradwatch.agent.core.record import RECORD_WIDTH, to_statistics
from gradwatch.agent.core.session import RecordedSteps
from gradwatch.agent.tensorflow.stats import to_norms


class UnsupportedStrategy(ValueError):
    """The strategy keeps no variable per replica (CentralStorageStrategy over several
    devices: one copy on the parameter device): a replica's step cannot write its own row."""


def _local_devices(strategy: tf.distribute.Strategy) -> int | None:
    try:
        return len(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # the default strategy has none
        return None


def row_bytes(num_variables: int) -> int:
    """Device memory of one row (one step of one replica), its step included."""
    return 4 * RECORD_WIDTH * num_variables + 8


def replica_local_variable(initial: tf.Tensor, name: str) -> tf.Variable:
    """One copy per local replica under a tf.distribute strategy (SyncOnRead, no
    aggregation): each replica writes its own copy in replica context.

    Not lifted: a ``tf.function`` whose first trace creates a variable it lifts (an
    optimizer's slots, built in that trace) traces a second time on that first call, so
    gradwatch's buffers, created there when a wrapped optimizer is built in the user's
    function or ``observe`` is first traced, would double its first-call time (+16 s on a
    400-variable model). Created eagerly (``tf.init_scope``), they need no lifting."""
    return tf.Variable(initial, trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.NONE,
                       experimental_enable_variable_lifting=False)


def _scatter(variable: tf.Variable, slot: tf.Tensor, value: tf.Tensor) -> tf.Operation:
    # SyncOnRead variables have no scatter_update; in replica context their handle is
    # the current replica's copy (and a plain variable's is itself).
    return tf.raw_ops.ResourceScatterUpdate(resource=variable.handle, indices=slot,
                                            updates=value)


class StepRecorder:
    """Ring buffer of ``capacity`` rows per local replica, ``num_variables`` wide: a
    session's `gradwatch.agent.core.session.StepSource`.

    Create it in cross-replica context (under ``strategy``'s scope, if any).
    `record` runs in replica context (or without a strategy): eagerly, in any
    ``tf.function`` and under XLA; each replica writes its own copy. `read_new`
    is for one host thread at a time, the sender's; it returns the steps that
    every local replica has recorded.
    """

    def __init__(self, num_variables: int, capacity: int, name: str = "gradwatch",
                 strategy: tf.distribute.Strategy | None = None) -> None:
        strategy = strategy or tf.distribute.get_strategy()
        self.num_variables = num_variables
        self.capacity = capacity
        self._slots = capacity + 1
        self._next = 0  # the first row not read yet
        with tf.init_scope(), strategy.scope():
            self._rows = replica_local_variable(
                tf.zeros([self._slots, RECORD_WIDTH * num_variables], tf.float32),
                f"{name}_rows")
            self._steps = replica_local_variable(tf.zeros([self._slots], tf.int64),
                                                 f"{name}_steps")
            self._count = replica_local_variable(tf.constant(0, tf.int64), f"{name}_count")
        self._replica_rows = strategy.experimental_local_results(self._rows)
        self._replica_steps = strategy.experimental_local_results(self._steps)
        self._replica_counts = strategy.experimental_local_results(self._count)
        self.num_replicas = len(self._replica_rows)
        devices = _local_devices(strategy)
        if devices is not None and devices != self.num_replicas:
            raise UnsupportedStrategy(
                f"{type(strategy).__name__} keeps one copy of each variable for its {devices} "
                "replicas, so a replica cannot record its own gradients")
        self._nothing = RecordedSteps.none(self.num_replicas, num_variables)

    def record(self, record: tf.Tensor, step: tf.Tensor | int | None = None) -> tf.Operation:
        """Appends one step's record (`gradient_record`) for the current replica.
        ``step`` defaults to the row's number (from 0)."""
        row = self._count.value()
        step = row if step is None else tf.cast(step, tf.int64)
        slot = row % self._slots
        writes = [_scatter(self._rows, slot, record), _scatter(self._steps, slot, step)]
        with tf.control_dependencies(writes):
            return self._count.assign_add(1)

    # The reads below are raw ops: from the sender thread each eager call costs 0.1-1 ms,
    # and the variables' Python wrappers add a third to a half of that.

    def _counts(self) -> np.ndarray:
        return np.array([tf.raw_ops.ReadVariableOp(resource=c.handle, dtype=tf.int64).numpy()
                         for c in self._replica_counts], np.int64)

    @staticmethod
    def _gather(variable: tf.Variable, slots: np.ndarray) -> np.ndarray:
        return tf.raw_ops.ResourceGather(resource=variable.handle, indices=slots,
                                         dtype=variable.dtype).numpy()

    def read_new(self) -> RecordedSteps:
        """Copies rows written since the previous call to the host (sender thread).

        ``stats`` is ``[n, num_replicas, num_variables, NUM_COLUMNS]``.
        """
        n = self.num_variables
        count = int(self._counts().min())
        first = max(self._next, count - self.capacity)
        dropped = first - self._next
        self._next = max(self._next, count)
        if first >= count:  # most reads (then nothing was dropped): nothing is allocated
            return self._nothing
        rows = np.arange(first, count, dtype=np.int64)
        slots = rows % self._slots
        records = np.stack([self._gather(r, slots) for r in self._replica_rows], axis=1)
        steps = self._gather(self._replica_steps[0], slots)
        # A row the writer reached again while we copied may be torn: drop it.
        intact = rows >= self._counts().max() - self.capacity
        return RecordedSteps(
            steps=steps[intact],
            stats=to_statistics(to_norms(records[intact], n), n),
            dropped=dropped + int((~intact).sum()),
        )
