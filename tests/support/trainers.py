"""A small Keras model trained eagerly step by step, for tests that inject faults between
steps."""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent import GradientMonitor

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)


class Trainer:
    """A small Keras model trained eagerly step by step, watched by ``monitor``."""

    def __init__(self, monitor: GradientMonitor) -> None:
        keras.utils.set_random_seed(1)
        self.model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"),
                                       keras.layers.Dense(1)])
        self.optimizer = monitor.wrap(keras.optimizers.SGD(0.01))
        self.steps = 0
        self.slowest_s = 0.0

    def train(self, steps: int) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self.model(X) - Y))
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply(grads, self.model.trainable_variables)
            if self.steps:  # the first step also builds the optimizer
                self.slowest_s = max(self.slowest_s, time.perf_counter() - start)
            self.steps += 1
