"""One worker of a MultiWorkerMirroredStrategy job (TF_CONFIG from the environment).

A custom loop with ``observe`` in replica context; the agent takes its task
type and index from TF_CONFIG. Prints ``done <task_index>`` when finished.
"""

import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent import GradientMonitor


def main(steps: int) -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task_index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    monitor = GradientMonitor(flush_interval_s=0.05)  # collector and job from GRADWATCH_*
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense"),
                                  keras.layers.Dense(2, name="unused")])
        model.build((None, 4))
        optimizer = keras.optimizers.SGD(0.1)
    x = np.random.default_rng(task_index).normal(size=(8, 4)).astype("float32")
    dense = model.get_layer("dense")

    @tf.function
    def train_step(batch):
        def replica_step(batch):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(dense(batch) - 1.0))  # "unused" never called
            grads = tape.gradient(loss, model.trainable_variables)
            monitor.observe(grads, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=(batch,))

    for _ in range(steps):
        train_step(tf.constant(x))
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("gradwatch").addHandler(handler)
    with strategy.scope():
        monitor.wrap(keras.optimizers.Adam())  # Keras 3 fit would fail here: say so
    print("warned" if any("keras-team/keras#20585" in w for w in warnings) else "silent")
    assert monitor.close(timeout_s=10)
    print(f"done {task_index}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
