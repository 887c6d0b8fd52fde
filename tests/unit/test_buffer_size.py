"""The agent's buffer accounting is honest, and its default holds 10 minutes of a
1,000-variable job (the documented promise, docs/limits.md)."""

from __future__ import annotations

import numpy as np

from gradwatch.agent.core.buffer import step_bytes
from gradwatch.agent.core.settings import DEFAULT_MAX_BUFFER_BYTES
from gradwatch.proto.layout import NUM_COLUMNS, pack_step


def test_accounted_bytes_match_a_real_step_report():
    for variables, replicas in ((4, 1), (1_000, 1), (1_000, 8)):
        stats = np.random.default_rng(0).random((replicas, variables, NUM_COLUMNS), np.float32)
        actual = pack_step(123_456, stats, 1.8e9).ByteSize()
        assert actual <= step_bytes(replicas, variables) <= actual * 1.1 + 64


def test_default_buffer_holds_ten_minutes_of_a_1000_variable_job_at_10_steps_per_second():
    steps = DEFAULT_MAX_BUFFER_BYTES // step_bytes(1, 1_000)
    assert steps >= 10 * 60 * 10
