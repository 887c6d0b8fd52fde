"""The on-device ring buffer: what the host reads is what the step wrote."""

import numpy as np
import tensorflow as tf

from gradwatch.agent.core.record import RECORD_WIDTH
from gradwatch.agent.tensorflow.recorder import StepRecorder
from gradwatch.proto.layout import COLUMN, NUM_COLUMNS


def stats_for(value: float, num_variables: int = 3) -> tf.Tensor:
    """A device record whose norms are ``value`` (it holds ½‖g‖²) and counts 0."""
    return tf.concat([tf.fill([num_variables], 0.5 * value * value),
                      tf.zeros([(RECORD_WIDTH - 1) * num_variables])], 0)


def test_reads_each_step_once_in_order():
    recorder = StepRecorder(3, capacity=8)
    for i in range(5):
        recorder.record(stats_for(float(i)), step=100 + i)
    got = recorder.read_new()
    assert got.steps.tolist() == [100, 101, 102, 103, 104]
    assert got.stats.shape == (5, 1, 3, NUM_COLUMNS)
    assert got.stats[:, 0, 0, COLUMN["l2_norm"]].tolist() == [0, 1, 2, 3, 4]
    assert got.stats[:, 0, :, COLUMN["present"]].all()
    assert got.dropped == 0
    assert recorder.read_new().steps.size == 0


def test_default_step_is_the_count():
    recorder = StepRecorder(1, capacity=4)
    recorder.record(stats_for(0.0, 1))
    recorder.record(stats_for(0.0, 1))
    assert recorder.read_new().steps.tolist() == [0, 1]


def test_overwritten_steps_are_counted_as_dropped():
    recorder = StepRecorder(2, capacity=4)
    for i in range(10):
        recorder.record(stats_for(float(i), 2), step=i)
    got = recorder.read_new()
    assert got.steps.tolist() == [6, 7, 8, 9]
    assert got.dropped == 6


def test_large_step_numbers_stay_exact():
    recorder = StepRecorder(1, capacity=2)
    big = 2**40 + 12345
    recorder.record(stats_for(1.0, 1), step=big)
    assert recorder.read_new().steps.tolist() == [big]


def test_records_from_tf_function_and_xla():
    recorder = StepRecorder(2, capacity=16)

    @tf.function(jit_compile=True)
    def step(x):
        return recorder.record(stats_for(x, 2), step=tf.cast(x, tf.int64))

    for i in range(3):
        step(tf.constant(float(i)))
    got = recorder.read_new()
    assert got.steps.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(got.stats[:, 0, 1, COLUMN["l2_norm"]], [0.0, 1.0, 2.0])


def test_absent_gradients_read_as_absent():
    recorder = StepRecorder(2, capacity=4)
    recorder.record(tf.constant([-1.0, 12.5, 0.0, 0.0, 0.0, 0.0]), step=7)
    stats = recorder.read_new().stats[0, 0]
    assert stats[:, COLUMN["present"]].tolist() == [0, 1]
    assert stats[:, COLUMN["l2_norm"]].tolist() == [0, 5]


def test_a_row_the_writer_reaches_during_the_copy_is_dropped_not_read_torn(monkeypatch):
    """The reader copies rows below the count, then reads the count again: a row whose
    slot the writer may have been writing meanwhile is counted as dropped."""
    recorder = StepRecorder(1, capacity=4)
    for i in range(4):
        recorder.record(stats_for(float(i), 1), step=i)
    counts = iter([np.array([4]), np.array([6])])  # two more rows written during the copy
    monkeypatch.setattr(recorder, "_counts", lambda: next(counts))
    got = recorder.read_new()
    # Rows 5 and 6 go to the slots of rows 0 and 1 (5 slots: capacity + 1 spare); row 6
    # may still be in progress, so row 1 is at risk too.
    assert got.steps.tolist() == [2, 3]
    assert got.dropped == 2
