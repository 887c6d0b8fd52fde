"""A real Prometheus scrapes the collector: names, labels and values survive the trip."""

from __future__ import annotations

import subprocess

import grpc
import pytest

from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.services import PrometheusProcess, require_binary

pytestmark = pytest.mark.integration


def report_one_missing_variable(collector, job: str) -> None:
    with grpc.insecure_channel(collector.grpc_target) as channel:
        stub = pb_grpc.GradientWatchStub(channel)
        session = stub.Register(wire.registration(job=job), timeout=5).session_id
        batch = wire.batch(session, 1, wire.step(7, [1, 0, 1], norm=[3.0, 0.0, 4.0]))
        acks = list(stub.Report(iter([batch]), timeout=10))
        assert [a.sequence for a in acks] == [1]


def test_prometheus_sees_the_missing_gradient(collector):
    report_one_missing_variable(collector, "scraped")
    metrics_target = collector.metrics_url.removeprefix("http://").removesuffix("/metrics")
    require_binary("prometheus")
    with PrometheusProcess([metrics_target]) as prometheus:
        (missing,) = prometheus.wait_for(
            'gradwatch_gradient_present{training_job="scraped"} == 0')
        assert missing["metric"]["variable"] == "dense/v1"
        assert missing["metric"]["job"] == "gradwatch"  # Prometheus' own label, untouched
        assert "exported_job" not in missing["metric"]
        (norm,) = prometheus.wait_for(
            'gradwatch_global_gradient_norm{training_job="scraped"}')
        assert float(norm["value"][1]) == pytest.approx(5.0)
        assert prometheus.wait_for('up{job="gradwatch"} == 1')


def test_promtool_finds_no_problems_in_the_exposition(collector):
    promtool = require_binary("promtool")
    report_one_missing_variable(collector, "linted")
    result = subprocess.run([promtool, "check", "metrics"], input=collector.scrape(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "" and \
        result.stderr.strip() == "", result.stdout + result.stderr
