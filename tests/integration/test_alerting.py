"""Alerts end to end: training → collector rules → a real Alertmanager (API v2)."""

from __future__ import annotations

import json

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.models import ModelWithUnusedLayer, X, Y, mse_gradients, small_model
from tests.support.services import (
    AlertmanagerProcess,
    CollectorProcess,
    WebhookReceiver,
    require_binary,
)

pytestmark = pytest.mark.integration

CONFIG = {
    "resolve_after_seconds": 0.3,
    "evaluation_interval_seconds": 0.2,
    "rules": {"WorkerSilent": {"seconds": 1.5}},
}


@pytest.fixture(scope="module")
def am_webhook():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def alertmanager(am_webhook):
    require_binary("prometheus-alertmanager")
    with AlertmanagerProcess(am_webhook.url) as process:
        yield process


@pytest.fixture(scope="module")
def alerting_collector(alertmanager, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "collector.yaml"
    config.write_text(json.dumps(CONFIG))
    with CollectorProcess("--config", str(config), "--alertmanager-url",
                          alertmanager.url) as process:
        yield process


def train_with_unused_layer(collector, job: str, steps: int = 2) -> None:
    model = ModelWithUnusedLayer()
    model.build((None, 4))
    with GradientMonitor(collector=collector.grpc_target, training_job=job) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.Adam(0.01, name="adam")),
                      loss="mse")
        with pytest.warns(UserWarning):
            model.fit(X, Y, batch_size=16, epochs=1, steps_per_epoch=steps, verbose=0)


def test_unused_layer_pages_through_alertmanager_and_resolves_when_fixed(
        alerting_collector, alertmanager, am_webhook, job_name):
    train_with_unused_layer(alerting_collector, job_name)
    (alert,) = alertmanager.wait_for(bool, alertname="GradientMissing", training_job=job_name)
    assert alert["status"]["state"] == "active"
    assert alert["endsAt"] > alert["startsAt"]  # a lease, renewed while the job is broken
    assert alert["labels"] == {"alertname": "GradientMissing", "severity": "warning",
                               "training_job": job_name, "optimizer": alert["labels"]["optimizer"]}
    assert alert["annotations"]["variables"] == \
        "partly_unused/unused/kernel, partly_unused/unused/bias"
    assert "collector" not in json.dumps(alert["labels"])  # deduplicates across collectors
    # Alertmanager routed it on to its receiver, as it would to a pager.
    assert am_webhook.wait_for(lambda body: True, 10) is not None

    # The fix: the next run of the job (same task, same optimizer) uses every layer.
    model = small_model()
    with GradientMonitor(collector=alerting_collector.grpc_target, training_job=job_name,
                         flush_interval_s=0.05) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.Adam(0.01, name="adam")),
                      loss="mse")
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    alertmanager.wait_for(lambda alerts: alerts == [], alertname="GradientMissing",
                          training_job=job_name)


def test_nan_pages_as_gradient_nonfinite(alerting_collector, alertmanager, job_name):
    model = small_model()
    with GradientMonitor(collector=alerting_collector.grpc_target,
                         training_job=job_name) as monitor:
        grads = mse_gradients(model)
        poisoned = grads[1].numpy()
        poisoned[0] = np.nan
        monitor.observe([grads[0], tf.constant(poisoned), *grads[2:]],
                        model.trainable_variables)
        (alert,) = alertmanager.wait_for(bool, alertname="GradientNonFinite",
                                         training_job=job_name)
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["variables"] == model.trainable_variables[1].path
        monitor.observe(mse_gradients(model), model.trainable_variables)  # finite again
        alertmanager.wait_for(lambda alerts: alerts == [], alertname="GradientNonFinite",
                              training_job=job_name)


def test_healthy_run_raises_nothing(alerting_collector, alertmanager, job_name):
    model = small_model()
    with GradientMonitor(collector=alerting_collector.grpc_target, training_job=job_name,
                         flush_interval_s=0.05) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(0.01)), loss="mse")
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    import time

    time.sleep(2.0)  # longer than WorkerSilent's 1.5 s: a finished run is not silent
    assert alertmanager.alerts(training_job=job_name) == []


def test_silent_worker_pages(alerting_collector, alertmanager):
    """A task that registers, reports once, then vanishes without closing."""
    with grpc.insecure_channel(alerting_collector.grpc_target) as channel:
        stub = pb_grpc.GradientWatchStub(channel)
        session = stub.Register(wire.registration(job="vanished", task_index=3),
                                timeout=5).session_id
        acks = list(stub.Report(iter([wire.batch(session, 1, wire.step(0, [1, 1, 1]))]),
                                timeout=10))
        assert [a.sequence for a in acks] == [1]
    (alert,) = alertmanager.wait_for(bool, alertname="WorkerSilent", training_job="vanished")
    assert alert["annotations"]["tasks"] == "worker/3"


def test_a_dead_alertmanager_costs_ingest_nothing():
    import time

    from tests.support.metrics import parse_metrics, select
    from tests.support.services import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    sink = f"alertmanager:{dead}"

    def failed() -> dict[str, float]:
        return select(parse_metrics(collector.scrape()),
                      "gradwatch_collector_notifications_total", outcome="failed")

    with CollectorProcess("--alertmanager-url", dead) as collector, \
            grpc.insecure_channel(collector.grpc_target) as channel:
        # Every outcome is exported from the start: Prometheus's increase() sees the first.
        assert failed() == {f"outcome=failed,sink={sink}": 0.0, "outcome=failed,sink=log": 0.0}
        stub = pb_grpc.GradientWatchStub(channel)
        session = stub.Register(wire.registration(job="dead-sink"), timeout=5).session_id
        batches = [wire.batch(session, i, wire.step(i, [1, 0, 1])) for i in range(1, 51)]
        started = time.monotonic()
        acks = list(stub.Report(iter(batches), timeout=10))
        assert [a.sequence for a in acks] == list(range(1, 51))
        assert time.monotonic() - started < 5  # not waiting on the dead sink's retries
        deadline = time.monotonic() + 15
        while not any(failed().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert failed() == {f"outcome=failed,sink={sink}": 1.0, "outcome=failed,sink=log": 0.0}


def test_two_collectors_page_once(alertmanager):
    """Alert labels carry no collector identity, so Alertmanager deduplicates."""
    with CollectorProcess("--alertmanager-url", alertmanager.url) as first, \
            CollectorProcess("--alertmanager-url", alertmanager.url) as second:
        for collector in (first, second):
            with grpc.insecure_channel(collector.grpc_target) as channel:
                stub = pb_grpc.GradientWatchStub(channel)
                session = stub.Register(wire.registration(job="twice"), timeout=5).session_id
                list(stub.Report(iter([wire.batch(session, 1, wire.step(0, [1, 0, 1]))]),
                                 timeout=10))
        alertmanager.wait_for(lambda alerts: len(alerts) == 1, alertname="GradientMissing",
                              training_job="twice")
