"""Fails with "No gradients provided for any variable". Why? Ask the doctor:

    gradwatch doctor examples/no_gradients.py
"""

import keras
import numpy as np
import tensorflow as tf

x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")

inputs = keras.Input((8,))
hidden = keras.layers.Dense(16, activation="relu")(inputs)
probability = keras.layers.Dense(1, activation="sigmoid")(hidden)
decision = keras.layers.Lambda(lambda p: tf.round(p))(probability)  # 0/1, as the API wants
model = keras.Model(inputs, decision)

model.compile(optimizer="adam", loss="binary_crossentropy")
model.fit(x, y, epochs=1, verbose=0)
