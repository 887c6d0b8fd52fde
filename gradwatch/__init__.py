"""gradwatch: gradient-health monitoring for TensorFlow training jobs.

``gradwatch.agent`` runs inside training, ``gradwatch.collector`` is the
service; ``gradwatch.proto`` is the wire contract between them.
"""

__version__ = "0.1.0"
