"""Helpers for tests and benchmarks (``tests.support.*``): real services, faults,
certificates, /proc readers, metric parsing, wire messages and small trainers.
Not shipped with gradwatch."""
