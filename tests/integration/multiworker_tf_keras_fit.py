"""One worker of a MultiWorkerMirroredStrategy job training with tf-keras ``model.fit``
(``TF_USE_LEGACY_KERAS=1``, set by the test). The ``unused`` layer is tracked and
trainable but never called. Prints ``done <task_index>`` when finished."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf_keras

from gradwatch.agent import GradientMonitor


def main(steps: int) -> None:
    assert tf.keras is tf_keras or tf.keras.__name__.startswith("tf_keras"), tf.keras
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task_index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    monitor = GradientMonitor(flush_interval_s=0.05)  # collector and job from GRADWATCH_*
    with strategy.scope():
        tf_keras.utils.set_random_seed(0)
        inputs = tf_keras.Input((4,))
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(1, name="dense")(inputs))
        model.unused = tf_keras.layers.Dense(2, name="unused")
        model.unused.build((None, 4))
        model.compile(optimizer=monitor.wrap(tf_keras.optimizers.SGD(0.1)), loss="mse")
    rng = np.random.default_rng(0)  # every worker the same data, sharded by the strategy
    x = rng.normal(size=(8 * steps, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert monitor.close(timeout_s=10)
    print(f"done {task_index}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
