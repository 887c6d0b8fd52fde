"""Shared fixtures: a real collector subprocess and webhook receiver on loopback."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
from hypothesis import settings

# Before anything imports grpc, as a training script would: gradwatch turns gRPC's fork
# handlers off (gradwatch.agent.core.forking), and this process forks too.
import gradwatch.agent.core  # noqa: F401
from tests.support.services import CollectorProcess, WebhookReceiver

# Property tests: thorough by default (make test, CI); `make unit` picks the quick profile.
settings.register_profile("thorough", max_examples=5_000)
settings.register_profile("quick", max_examples=1_000)
settings.load_profile("thorough")


@pytest.fixture(scope="module")
def webhook():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def collector(webhook):
    # Changed annotations (a second task joining a firing alert) reach the webhook within 1 s.
    with CollectorProcess("--webhook-url", webhook.url, "--resolve-after", "0.3",
                          "--resend-interval-seconds", "1") as process:
        yield process
        assert process.process.poll() is None, f"collector died:\n{process.log()}"


@pytest.fixture
def job_name(request) -> str:
    """A training job name unique to the test, so tests sharing a collector don't mix."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
