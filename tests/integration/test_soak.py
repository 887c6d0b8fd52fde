"""Load and soak: 500 concurrent agent streams for 60 s against one collector process.

Drives `bench.soak` (raw gRPC, no TensorFlow; see its docstring). Asserts what
must hold at any speed — no lost acks, no stream errors, the collector's own
counters agree with what was sent, RSS flat (±10 %) after warm-up — and reports the
ack latency without asserting on it.
"""

from __future__ import annotations

import json

import pytest

from bench import soak

pytestmark = pytest.mark.integration


# 60 s of load, registration and drain take ~65 s on an idle 2-core machine; the limit
# leaves room for a busy one. run_soak stops its collector and generators on any error.
# One batch per 2 s per stream, half the benchmark's rate: the RSS check needs a collector
# that keeps up. At one per second it used 54 % of a core on this VM on 2026-11-26 but
# 86-90 % on 2026-12-01 (the code of both days alike): acks then waited seconds, and the
# batches queued meanwhile swung RSS past ±10 % with nothing leaking.
INTERVAL_S = 2.0


@pytest.mark.timeout(240)
def test_500_streams_for_60_seconds(record_property):
    result = soak.run_soak(streams=500, duration_s=60.0, interval_s=INTERVAL_S)

    print()
    print(result.summary())
    latency = result.ack_latency_ms
    record_property("ack_latency_p50_ms", round(latency.get("p50", float("nan")), 2))
    record_property("ack_latency_p99_ms", round(latency.get("p99", float("nan")), 2))
    record_property("ack_latency_max_ms", round(latency.get("max", float("nan")), 2))
    record_property("batches_sent", result.batches_sent)
    record_property("batches_acked", result.batches_acked)
    record_property("rss_mb", json.dumps({k: round(v, 1) for k, v in result.rss_mb.items()}))
    record_property("rss_drift_pct", round(result.rss_drift_pct, 2))
    record_property("collector_cpu_s", round(result.collector_cpu_s, 1))
    # Latency depends on what else the machine runs: how long the collector waited for a CPU.
    record_property("collector_runqueue_wait_s", round(result.collector_runqueue_wait_s, 1))
    record_property("load_average", json.dumps(result.load_average))

    assert result.streams == 500 and result.duration_s == 60.0
    # Every stream sent one batch per interval for the whole minute.
    assert result.batches_sent >= 500 * (60 / INTERVAL_S - 1), result.summary()
    assert result.lost_acks == 0, result.summary()
    assert result.acks_out_of_order == 0, result.summary()
    assert result.stream_errors == [], result.stream_errors[:5]
    counters = result.collector_counters
    assert counters["gradwatch_collector_registrations_total"] == 500
    assert counters["gradwatch_collector_sessions"] == 500
    assert counters["gradwatch_collector_batches_total"] == result.batches_sent
    assert counters["gradwatch_collector_duplicate_batches_total"] == 0
    assert counters["gradwatch_collector_rejected_messages_total"] == 0
    assert counters["gradwatch_collector_step_reports_total"] == (
        result.batches_sent * result.steps_per_batch)
    assert counters["gradwatch_collector_variable_statistics_total"] == (
        result.batches_sent * result.steps_per_batch * result.variables)
    rss = result.rss_mb
    assert rss["min"] >= 0.9 * rss["median"] and rss["max"] <= 1.1 * rss["median"], (
        result.summary())
    assert result.ok, result.summary()
