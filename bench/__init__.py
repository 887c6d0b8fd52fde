"""Benchmarks: run each from the repository root as ``.venv/bin/python -m bench.NAME``
(see docs/benchmarks.md). They print figures; nothing here is a test."""
