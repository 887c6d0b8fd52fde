"""On-device ring buffer holding the records of a session's most recent steps.

The training step *writes* one row per step into TensorFlow variables (no host
work, no Python at run time, so ``tf.function`` and XLA are fine). The sender
thread *reads* new rows every flush interval. Neither side waits for the other:
if the host falls more than ``capacity`` steps behind, the oldest rows are
overwritten and counted as dropped.

Row layout (float32): ``[seq, step, record...]``, where the int64 sequence number and
step are stored bit for bit (``tf.bitcast``: two float32 slots each, no arithmetic),
and ``record`` is one step's `gradwatch.agent.tensorflow.stats.gradient_record`. One
row is written by one scatter, so a reader never sees half a row; the sequence
number in the row tells a reader whether the slot still holds the step it expects.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradwatch.agent.core.record import RECORD_WIDTH, to_statistics
from gradwatch.agent.core.session import RecordedSteps

_HEADER = 4  # float32 slots holding (seq, step) as two int64


def row_bytes(num_variables: int) -> int:
    """Device memory of one row (one step of one replica)."""
    return 4 * (_HEADER + RECORD_WIDTH * num_variables)


def _replica_local_variable(initial: tf.Tensor, name: str) -> tf.Variable:
    """One copy per local replica under a tf.distribute strategy (SyncOnRead, no
    aggregation): each replica writes its own copy in replica context."""
    return tf.Variable(initial, trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.NONE)


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
        self._last_read = 0
        with tf.init_scope(), strategy.scope():
            self._rows = _replica_local_variable(
                tf.zeros([capacity, _HEADER + RECORD_WIDTH * num_variables], tf.float32),
                f"{name}_rows")
            self._count = _replica_local_variable(tf.constant(0, tf.int64), f"{name}_count")
        self._replica_rows = strategy.experimental_local_results(self._rows)
        self._replica_counts = strategy.experimental_local_results(self._count)
        self.num_replicas = len(self._replica_rows)

    def record(self, record: tf.Tensor, step: tf.Tensor | int | None = None) -> tf.Operation:
        """Appends one step's record (`gradient_record`) for the current replica.
        ``step`` defaults to the recorder's own count (1-based)."""
        seq = self._count + 1
        step = seq if step is None else tf.cast(step, tf.int64)
        header = tf.reshape(tf.bitcast(tf.stack([seq, step]), tf.float32), [_HEADER])
        row = tf.concat([header, record], 0)
        slot = seq % self.capacity
        # SyncOnRead variables have no scatter_update; in replica context their
        # handle is the current replica's copy (and a plain variable's is itself).
        write = tf.raw_ops.ResourceScatterUpdate(
            resource=self._rows.handle, indices=slot[None], updates=row[None])
        with tf.control_dependencies([write]):
            return self._count.assign_add(1)

    def steps_recorded(self) -> tf.Tensor:
        """How many steps this replica has recorded (int64, where `record` runs)."""
        return self._count.read_value()

    def read_new(self) -> RecordedSteps:
        """Copies rows written since the previous call to the host (sender thread).

        ``stats`` is ``[n, num_replicas, num_variables, NUM_COLUMNS]``.
        """
        count = min(int(c.numpy()) for c in self._replica_counts)
        n = self.num_variables
        first = max(self._last_read + 1, count - self.capacity + 1)
        dropped = first - self._last_read - 1
        seqs = np.arange(first, count + 1, dtype=np.int64)
        self._last_read = max(self._last_read, count)
        if seqs.size == 0:
            return RecordedSteps(np.zeros(0, np.int64), to_statistics(
                np.zeros((0, self.num_replicas, RECORD_WIDTH * n), np.float32), n), dropped)
        slots = seqs % self.capacity
        rows = np.stack([tf.gather(r, slots).numpy() for r in self._replica_rows], axis=1)
        header = np.ascontiguousarray(rows[..., :_HEADER]).view(np.int64)  # [n, R, 2]
        # A slot may have been overwritten by a newer step while we copied.
        intact = (header[..., 0] == seqs[:, None]).all(axis=1)
        return RecordedSteps(
            steps=header[intact, 0, 1],
            stats=to_statistics(rows[intact, :, _HEADER:], n),
            dropped=dropped + int((~intact).sum()),
        )
