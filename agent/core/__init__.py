"""The framework-neutral agent core: settings, identity, endpoints, channel, sessions,
buffer, the report stream and failover, fork safety, and the monitor's shared half.

Imports no ML framework (a test imports it with TensorFlow and torch blocked);
front ends build on it.
"""

from gradwatch.agent.core import forking as _forking  # noqa: F401  (before anything imports grpc)
