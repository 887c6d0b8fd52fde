"""Models shared by the agent benchmarks."""

from __future__ import annotations

import keras
import numpy as np


def cnn_case():
    """A 6-layer CNN with batch norm (26 trainable variables) and a batch of 32 images of
    32x32x3: ``(model, x, loss_fn(logits))``."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((32, 32, 3))]
    for width in (32, 32, 64, 64, 128, 128):
        layers += [keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
                   keras.layers.BatchNormalization()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype("float32")
    y = np.arange(32) % 10
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, x, lambda logits: loss(y, logits)
