"""Shared fixtures: a real collector subprocess and webhook receiver on loopback."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.testing import CollectorProcess, WebhookReceiver


@pytest.fixture(scope="module")
def webhook():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def collector(webhook):
    with CollectorProcess("--webhook-url", webhook.url, "--resolve-after", "0.3") as process:
        yield process
        assert process.process.poll() is None, f"collector died:\n{process.log()}"


@pytest.fixture
def job_name(request) -> str:
    """A training job name unique to the test, so tests sharing a collector don't mix."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)], via prometheus_client's own parser."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def select(samples, name: str, **labels: str) -> dict[str, float]:
    """Values of ``name`` whose labels include ``labels``, keyed by the ``variable``
    label (or by all labels when there is none)."""
    out = {}
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            key = sample_labels.get("variable") or ",".join(
                f"{k}={v}" for k, v in sorted(sample_labels.items()))
            out[key] = value
    return out
