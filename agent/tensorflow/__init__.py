"""The TensorFlow front end: optimizer hooks, in-graph statistics, the on-device ring
buffer and the diagnosis of missing gradients (Keras 3, tf-keras, ``tf.distribute``)."""

from gradwatch.agent.tensorflow.doctor import diagnose_missing_gradients
from gradwatch.agent.tensorflow.monitor import GradientMonitor

__all__ = ["GradientMonitor", "diagnose_missing_gradients"]
