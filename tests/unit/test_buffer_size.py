"""The agent's buffer accounting is honest, and its default holds 10 minutes of a
1,000-variable job (the documented promise, docs/limits.md)."""

from __future__ import annotations

import numpy as np

from gradwatch.agent.monitor import DEFAULT_MAX_BUFFER_BYTES
from gradwatch.agent.sender import _BYTES_PER_STATISTIC, _BYTES_PER_STEP
from gradwatch.agent.session import step_report


def accounted_bytes(variables: int, replicas: int) -> int:
    return variables * replicas * _BYTES_PER_STATISTIC + _BYTES_PER_STEP


def test_accounted_bytes_match_a_real_step_report():
    for variables, replicas in ((4, 1), (1_000, 1), (1_000, 8)):
        stats = np.random.default_rng(0).random((replicas, variables, 5), np.float32)
        report = step_report(123_456, stats, 1.8e9)
        actual = report.ByteSize()
        assert actual <= accounted_bytes(variables, replicas) <= actual * 1.1 + 64


def test_default_buffer_holds_ten_minutes_of_a_1000_variable_job_at_10_steps_per_second():
    steps = DEFAULT_MAX_BUFFER_BYTES // accounted_bytes(1_000, 1)
    assert steps >= 10 * 60 * 10
