"""The gradwatch agent: runs inside training and reports gradient statistics.

Needs TensorFlow; never imports prometheus_client or the collector.
"""

from gradwatch.agent.doctor import diagnose_missing_gradients
from gradwatch.agent.monitor import GradientMonitor

__all__ = ["GradientMonitor", "diagnose_missing_gradients"]
