"""Small Keras models and data shared by the TensorFlow tests."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")


def small_model(name: str = "model") -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu", name="hidden"),
                             keras.layers.Dense(1, name="out")], name=name)


class ModelWithUnusedLayer(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="partly_unused")
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.out = keras.layers.Dense(1, name="out")
        self.unused = keras.layers.Dense(3, name="unused")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.out.build((None, 8))
        self.unused.build((None, 8))
        self.built = True

    def call(self, x):
        return self.out(self.hidden(x))


def mse_gradients(model: keras.Model) -> list[tf.Tensor]:
    """One eager step's gradients of the mean squared error on X, Y."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(X) - Y))
    return tape.gradient(loss, model.trainable_variables)
