"""Keras 3 on the torch backend with the TensorFlow agent's wrapped optimizer, for
tests/integration/test_training.py: three updates of known gradients (all ``i + 1``),
so each reported norm is ``3 * sqrt(size)``. The collector comes from
``GRADWATCH_COLLECTOR``.

    KERAS_BACKEND=torch python keras_torch_backend_job.py JOB
"""

from __future__ import annotations

import sys

import keras
import torch

from gradwatch.agent import GradientMonitor

if __name__ == "__main__":
    monitor = GradientMonitor(training_job=sys.argv[1], flush_interval_s=0.05)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    optimizer = monitor.wrap(keras.optimizers.SGD(1e-3))
    for i in range(3):
        optimizer.apply([torch.full(tuple(v.shape), i + 1.0) for v in model.trainable_variables],
                        model.trainable_variables)
    assert monitor.close(timeout_s=10)
