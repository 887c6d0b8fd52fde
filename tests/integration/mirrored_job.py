"""A custom MirroredStrategy loop (2 logical CPUs) with ``observe`` in replica context.

Run as a subprocess (logical devices must be configured before TensorFlow
starts). Prints, as JSON on the last line, the per-replica global gradient
norms of the last step, computed here from the gradients themselves.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from gradwatch.agent import GradientMonitor  # noqa: E402


def main(collector: str, job: str) -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    monitor = GradientMonitor(collector=collector, training_job=job, flush_interval_s=0.05)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
        optimizer = keras.optimizers.SGD(0.1)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8).repeat(3))

    @tf.function
    def train_step(batch):
        def replica_step(batch):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(batch) - 1.0))
            grads = tape.gradient(loss, model.trainable_variables)
            monitor.observe(grads, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return tf.linalg.global_norm(grads)

        return strategy.run(replica_step, args=(batch,))

    for batch in dataset:
        norms = train_step(batch)
    assert monitor.close(timeout_s=10)
    print(json.dumps([float(n) for n in strategy.experimental_local_results(norms)]))


if __name__ == "__main__":
    main(*sys.argv[1:])
