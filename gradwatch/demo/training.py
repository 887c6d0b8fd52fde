"""The demo's training job: a small Keras model with two classic gradient breaks.

* the ``price`` head's output goes through ``tf.math.floor`` before the loss
  (floor has no gradient), so the head and nothing else loses its gradient;
* the ``unused_projection`` layer is built but never called.

Everything else trains normally, so Keras only warns once and the loss keeps
going down: the silent kind of failure gradwatch exists for. Run with the
agent configured by ``GRADWATCH_*`` environment variables.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent import GradientMonitor


class BrokenModel(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = keras.layers.Dense(32, activation="relu", name="trunk")
        self.category = keras.layers.Dense(4, name="category")
        self.price = keras.layers.Dense(1, name="price")
        self.unused_projection = keras.layers.Dense(8, name="unused_projection")

    def build(self, input_shape):
        self.trunk.build(input_shape)
        self.category.build((None, 32))
        self.price.build((None, 32))
        self.unused_projection.build((None, 32))  # built, never called: no gradient
        self.built = True

    def call(self, x):
        h = self.trunk(x)
        # Rounding a prediction "to whole dollars" inside the model: floor has no gradient.
        return self.category(h), tf.math.floor(self.price(h))


def make_data(n: int = 512, seed: int = 0) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    category = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0).astype("int64")
    price = (10 * x[:, 2:4].sum(axis=1, keepdims=True)).astype("float32")
    return x, (category, price)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2,
                        help="logical CPU devices for MirroredStrategy")
    args = parser.parse_args(argv)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])

    with GradientMonitor() as monitor, strategy.scope():
        model = BrokenModel()
        model.build((None, 16))
        optimizer = monitor.wrap(keras.optimizers.Adam(1e-2))
        model.compile(optimizer=optimizer,
                      loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            keras.losses.MeanSquaredError()])
        x, y = make_data()
        model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=2)


if __name__ == "__main__":
    main()
