"""A custom training step as the Keras guide writes it: ``@tf.function`` with AutoGraph
on (TensorFlow's default), gradwatch first called inside its trace, through MODE:
``observe`` or ``wrap`` (a wrapped optimizer's ``apply``). For
tests/integration/test_training.py, which reads this process's stderr.

    python autograph_job.py MODE JOB
"""

from __future__ import annotations

import sys

import keras
import tensorflow as tf

from gradwatch.agent import GradientMonitor


def main(mode: str, job: str) -> int:
    monitor = GradientMonitor(training_job=job, flush_interval_s=0.05)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.1)
    if mode == "wrap":
        optimizer = monitor.wrap(optimizer)
    x = tf.random.stateless_normal((8, 3), seed=(1, 2))
    y = tf.reduce_sum(x, 1, keepdims=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        if mode == "observe":
            monitor.observe(grads, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    for _ in range(3):
        step()
    return 0 if monitor.close() else 4


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
